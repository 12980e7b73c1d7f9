"""Long-context block memory (InfLLM-style, FAISS-indexed) and recycled-token drafting: not built yet (see
design.md); the package exists so the layout is fixed."""
