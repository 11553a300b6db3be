"""Other formats: GGUF control vectors and vector maps in and out, CAST import, and a GGUF header reader. Imports the
top and `finesteer.patching` (the layer finder) only."""
