"""Studies on real models: demo, eval, transfer, which layer to steer, the refusal detector, generation helpers and
report writers. Each study is a function with plain arguments; the command line (`finesteer.cli`) parses flags."""
