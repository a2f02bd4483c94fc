"""Evaluation of CAFe models: retrieval (images and videos), MMEB, POPE hallucination, the
modality gap, caption attribute accuracy and video caption accuracy.

Each metric is a pure function on tensors / lists (easy to test and to reuse on embeddings from
elsewhere); the ``evaluate_*`` runners embed or generate with a `CafeForConditionalGeneration`
and call them.
"""

from .captioning import (
    DEFAULT_CAPTION_PROMPT,
    caption_attribute_accuracy,
    evaluate_captions,
)
from .language import (
    answer_contains,
    generate_text_answers,
    normalize_answer,
    perplexity,
    score_answers,
    token_f1,
)
from .mmeb import (
    MMEB_IN_DISTRIBUTION,
    MMEB_META_TASKS,
    MMEB_SUBSETS,
    evaluate_mmeb,
    evaluate_mmeb_subset,
    precision_at_1,
    precision_at_1_per_query,
    summarize_mmeb,
)
from .modality_gap import (
    draw_scatter,
    evaluate_modality_gap,
    modality_gap,
    project_2d,
    save_embedding_scatter,
)
from .pope import (
    evaluate_pope,
    evaluate_pope_dataset,
    generate_answers,
    generate_visual_answers,
    parse_yes_no,
    pope_metrics,
    pope_metrics_by_category,
)
from .retrieval import (
    caption_image_index,
    evaluate_retrieval,
    evaluate_retrieval_dataset,
    group_recall_ceiling,
    load_retrieval_data,
    positive_ranks,
    recall_from_ranks,
    retrieval_recall,
)
from .video import (
    evaluate_video_captions,
    evaluate_video_retrieval,
    motion_accuracy,
    video_retrieval_recall,
)

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "answer_contains",
    "generate_text_answers",
    "normalize_answer",
    "perplexity",
    "score_answers",
    "token_f1",
    "MMEB_IN_DISTRIBUTION",
    "MMEB_META_TASKS",
    "MMEB_SUBSETS",
    "caption_attribute_accuracy",
    "caption_image_index",
    "draw_scatter",
    "evaluate_mmeb",
    "evaluate_mmeb_subset",
    "evaluate_captions",
    "evaluate_modality_gap",
    "evaluate_pope",
    "evaluate_pope_dataset",
    "evaluate_retrieval",
    "evaluate_retrieval_dataset",
    "evaluate_video_captions",
    "evaluate_video_retrieval",
    "generate_answers",
    "generate_visual_answers",
    "group_recall_ceiling",
    "load_retrieval_data",
    "modality_gap",
    "motion_accuracy",
    "parse_yes_no",
    "pope_metrics",
    "pope_metrics_by_category",
    "positive_ranks",
    "precision_at_1",
    "precision_at_1_per_query",
    "project_2d",
    "recall_from_ranks",
    "retrieval_recall",
    "save_embedding_scatter",
    "summarize_mmeb",
    "video_retrieval_recall",
]
