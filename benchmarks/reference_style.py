"""A faithful re-implementation of how the reference CAFe code trains and embeds (the baseline).

What the reference does (see the project's reference notes), and how it is reproduced here on
the stock transformers `LlavaOnevisionForConditionalGeneration` forward:

Training step, per batch, in one autograd graph:

1. image-embedding sequence (``<image>\\nCompress this image in one word:``): the vision tower
   runs on the images, the LLM on the sequence; embedding = last-layer hidden state of the last
   real token (``attention_mask.sum(1) - 1``, right padding).
2. text-embedding sequence: the vision tower runs again, on *zero images* of the same shape, whose
   features are then dropped (the reference concatenates an empty slice of them, so they stay in
   the graph and get a backward pass too); the LLM runs on the text sequence.
3. LM sequence: the vision tower runs a third time, on the same images as in 1; the LM loss comes
   from the stock forward with ``labels``: full-vocabulary logits over every position, then
   transformers' causal-LM loss (it upcasts the logits to float32, as the reference's Qwen2
   forward did).

Then ``loss = con_weight * InfoNCE + lm_loss`` with the InfoNCE loss in the model dtype (bf16):
no float32 upcast, fixed temperature 0.05. One backward.

Conservative choice: the two embedding passes of the step run the backbone without the LM head.
If the reference also computed (unused) full-vocabulary logits there, its step is slower still.

Embedding (evaluation): one input per forward, through the full model (LM head included) with
``output_hidden_states=True``, pooled from the last hidden state.

The batch is the very same `CafeCollator` batch the cafe side uses (same token sequences, same
images), only laid out the reference's way: each sequence carries its own copy of its images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_TEMPERATURE = 0.05
REFERENCE_CON_WEIGHT = 10.0


def reference_batch(batch) -> dict:
    """The three sequences of a `CafeCollator` batch (`cafe.batch.CafeBatch`), each with its own pixel tensor."""
    pixel_values, image_sizes = batch.vision["pixel_values"], batch.vision["image_sizes"]
    query, doc, lm = batch.query, batch.doc, batch.lm
    if len(query.image_index) != len(query) or len(lm.image_index) != len(lm):
        raise ValueError("The reference-style step expects one image per query and per LM sequence.")
    return {
        "image": {
            "input_ids": query.input_ids,
            "attention_mask": query.attention_mask,
            "pixel_values": pixel_values[query.image_index].clone(),
            "image_sizes": image_sizes[query.image_index].clone(),
        },
        # The reference feeds zero images to the text pass (one per text, same shape).
        "text": {
            "input_ids": doc.input_ids,
            "attention_mask": doc.attention_mask,
            "pixel_values": torch.zeros_like(pixel_values[query.image_index]),
            "image_sizes": image_sizes[query.image_index].clone(),
        },
        "lm": {
            "input_ids": lm.input_ids,
            "attention_mask": lm.attention_mask,
            "labels": lm.labels,
            "pixel_values": pixel_values[lm.image_index].clone(),
            "image_sizes": image_sizes[lm.image_index].clone(),
        },
    }


def _last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    index = attention_mask.sum(1) - 1  # right padding, as the reference
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def reference_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE in the model dtype (the reference does not upcast)."""
    q = F.normalize(image_embeds, dim=-1)
    d = F.normalize(text_embeds, dim=-1)
    logits = (q @ d.T) / REFERENCE_TEMPERATURE
    labels = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_training_loss(model, ref: dict, con_weight: float = REFERENCE_CON_WEIGHT) -> torch.Tensor:
    """Forward of one reference-style step: three vision passes, three LLM passes."""
    backbone = model.model
    image = ref["image"]
    image_hidden = backbone(
        input_ids=image["input_ids"],
        attention_mask=image["attention_mask"],
        pixel_values=image["pixel_values"],
        image_sizes=image["image_sizes"],
        use_cache=False,
    ).last_hidden_state
    image_embeds = _last_token(image_hidden, image["attention_mask"])

    text = ref["text"]
    zero_features = backbone.get_image_features(
        pixel_values=text["pixel_values"], image_sizes=text["image_sizes"], return_dict=True
    ).pooler_output
    text_inputs = model.get_input_embeddings()(text["input_ids"])
    # Dropped but kept in the graph, like the reference's `cat(embeds, features[0:0])`.
    text_inputs = text_inputs + sum(f[:0].sum() for f in zero_features)
    text_hidden = backbone(
        inputs_embeds=text_inputs, attention_mask=text["attention_mask"], use_cache=False
    ).last_hidden_state
    text_embeds = _last_token(text_hidden, text["attention_mask"])

    lm = ref["lm"]
    lm_loss = model(
        input_ids=lm["input_ids"],
        attention_mask=lm["attention_mask"],
        pixel_values=lm["pixel_values"],
        image_sizes=lm["image_sizes"],
        labels=lm["labels"],
        use_cache=False,
    ).loss  # full-vocabulary logits at every position
    return con_weight * reference_contrastive_loss(image_embeds, text_embeds) + lm_loss


def reference_training_step(model, ref: dict) -> float:
    loss = reference_training_loss(model, ref)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def reference_embed(model, single_inputs: list[dict]) -> torch.Tensor:
    """One input per forward through the full model, hidden states requested (reference eval)."""
    out = []
    with torch.inference_mode():
        for inputs in single_inputs:
            outputs = model(**inputs, output_hidden_states=True, use_cache=False)
            pooled = _last_token(outputs.hidden_states[-1], inputs["attention_mask"])
            out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------- LM loss alone
def full_logits_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head, upcast: bool = True) -> torch.Tensor:
    """The LM loss over full-vocabulary logits at every position.

    ``upcast=True`` is what the stock transformers loss (and the reference's Qwen2 forward) does:
    logits -> float32 before the cross-entropy. ``upcast=False`` keeps everything in the model
    dtype, the smallest a full-logits loss can be.
    """
    logits = lm_head(hidden)  # [batch, seq, vocab]
    if upcast:
        logits = logits.float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
