"""What plugs into the Decoder: recycled-token drafts (memory/recycling.py) and the InfLLM-style context memory
for inputs longer than the trained window (memory/context.py, its blocks and FAISS index in memory/blocks.py)."""
