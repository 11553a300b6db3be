"""Serving engines that steer every request with its own steerer (``finesteer.serving.vllm``: the vLLM plugin).

A wing beside `finesteer.patching`: it imports the top of the package (`Steerer`), the patching helpers it truly
shares and `finesteer_kernels`, never the fitting, studies or command-line wings.
"""
