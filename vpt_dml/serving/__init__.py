"""Serving: a saved faiss index over embeddings, ONNX export of the embedder."""
