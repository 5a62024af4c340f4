"""Evaluation: image-text retrieval (ITC ranking + ITM re-ranking) and VQA accuracy."""

from vlp_core.eval.retrieval import RetrievalSet, evaluate_retrieval, recall_at_k, rerank_topk
from vlp_core.eval.vqa import vqa_accuracy

__all__ = ["RetrievalSet", "evaluate_retrieval", "recall_at_k", "rerank_topk", "vqa_accuracy"]
