"""Eq. 1 and Eq. 2 against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from cafe.losses import ContrastiveLoss, false_negative_mask, hard_negative_mask, lm_loss_at_supervised_positions


def _unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def _ce(row, target):
    return -(row[target] - torch.logsumexp(row, 0))


def test_symmetric_infonce_matches_hand_computation():
    q = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0])
    d = _unit([0.9, 0.1, 0.0], [0.1, 0.9, 0.2], [0.5, 0.5, 0.5])
    tau = 0.05
    s = (q @ d.T) / tau
    by_hand = (sum(_ce(s[i], i) for i in range(3)) / 3 + sum(_ce(s.T[i], i) for i in range(3)) / 3) / 2
    out = ContrastiveLoss(temperature=tau)(q, d)
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert out.logit_scale.item() == pytest.approx(20.0)


def test_hard_negatives_add_columns_to_query_direction_only():
    q = _unit([1.0, 0.0], [0.0, 1.0])
    d = _unit([1.0, 0.2], [0.3, 1.0])
    neg = _unit([1.0, 0.1], [0.5, 0.5], [0.0, 1.0])
    s = (q @ d.T) / 0.05
    sn = (q @ neg.T) / 0.05
    q2d = sum(_ce(torch.cat([s[i], sn[i]]), i) for i in range(2)) / 2
    d2q = sum(_ce(s.T[i], i) for i in range(2)) / 2
    out = ContrastiveLoss(0.05)(q, d, negative_embeds=neg)
    assert out.loss.item() == pytest.approx(((q2d + d2q) / 2).item(), rel=1e-6)


def test_false_negatives_are_masked():
    # Rows 0 and 2 share the same text: for query 0, document 2 is not a negative (and vice versa).
    q = _unit([1.0, 0.0], [0.0, 1.0], [0.7, 0.7])
    d = _unit([1.0, 0.1], [0.1, 1.0], [1.0, 0.1])
    doc_groups = torch.tensor([5, 7, 5])
    s = (q @ d.T) / 0.05
    keep = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    masked = s.masked_fill(~keep, float("-inf"))
    by_hand = (sum(_ce(masked[i], i) for i in range(3)) / 3 + sum(_ce(masked.T[i], i) for i in range(3)) / 3) / 2
    out = ContrastiveLoss(0.05)(q, d, doc_groups=doc_groups)
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    unmasked = ContrastiveLoss(0.05)(q, d)
    assert unmasked.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)
    assert false_negative_mask(torch.tensor([1, 2, 3]), doc_groups).tolist() == (~keep).tolist()


def test_a_hard_negative_showing_a_rows_own_positive_is_masked_for_that_row():
    """Row 0's mined negative is row 1's document: a negative for query 0, the positive of query 1.

    Row 2 repeats row 1's document, so that negative is query 2's positive too; the unrelated
    negative stays a column for every query.
    """
    q = _unit([1.0, 0.0], [0.0, 1.0], [0.2, 1.0])
    d = _unit([1.0, 0.2], [0.1, 1.0], [0.1, 1.0])
    neg = _unit([0.1, 1.0], [0.6, 0.4])
    doc_groups, negative_groups = torch.tensor([3, 8, 8]), torch.tensor([8, 9])
    s = (q @ d.T) / 0.05
    sn = (q @ neg.T) / 0.05
    keep = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # rows 1 and 2: same document
    keep_negatives = torch.tensor([[1, 1], [0, 1], [0, 1]], dtype=torch.bool)
    q2d = torch.cat([s.masked_fill(~keep, float("-inf")), sn.masked_fill(~keep_negatives, float("-inf"))], dim=1)
    d2q = s.masked_fill(~keep, float("-inf")).T
    by_hand = (sum(_ce(q2d[i], i) for i in range(3)) / 3 + sum(_ce(d2q[i], i) for i in range(3)) / 3) / 2
    out = ContrastiveLoss(0.05)(q, d, neg, doc_groups=doc_groups, negative_groups=negative_groups)
    assert out.loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    unmasked = ContrastiveLoss(0.05)(q, d, neg, doc_groups=doc_groups)
    assert unmasked.loss.item() > out.loss.item() + 0.1  # query 1 no longer pushes its own text away
    mask = hard_negative_mask(false_negative_mask(None, doc_groups), doc_groups, negative_groups)
    assert mask.tolist() == (~keep_negatives).tolist()
    assert hard_negative_mask(None, doc_groups, None) is None


def test_a_batch_of_one_repeated_item_says_the_loss_compared_nothing():
    """All pairs show the same image: masking removes every negative, the term is 0 by construction."""
    q, d = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.warns(UserWarning, match="had nothing to compare: all 3 pairs .* same image / text"):
        out = ContrastiveLoss(0.05)(q, d, query_groups=torch.tensor([4, 4, 4]))
    assert out.loss.item() == 0.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # some negatives left, or hard negatives: no warning
        ContrastiveLoss(0.05)(q, d, query_groups=torch.tensor([4, 4, 5]))
        ContrastiveLoss(0.05)(q, d, torch.randn(2, 8), query_groups=torch.tensor([4, 4, 4]))
    # Hard negatives that all show the (one) positive leave nothing either.
    with pytest.warns(UserWarning, match="had nothing to compare: .*hard negatives included"):
        groups = {"query_groups": torch.tensor([4, 4, 4]), "doc_groups": torch.tensor([7, 7, 7])}
        out = ContrastiveLoss(0.05)(q, d, torch.randn(2, 8), **groups, negative_groups=torch.tensor([7, 7]))
    assert out.loss.item() == 0.0


def test_loss_is_float32_under_bf16_inputs():
    q = torch.randn(4, 8, dtype=torch.bfloat16)
    d = torch.randn(4, 8, dtype=torch.bfloat16)
    assert ContrastiveLoss()(q, d).loss.dtype == torch.float32


def test_learnable_logit_scale_gets_gradient():
    loss_fn = ContrastiveLoss(0.05, learnable=True)
    out = loss_fn(torch.randn(4, 8), torch.randn(4, 8))
    out.loss.backward()
    assert loss_fn.log_logit_scale.grad is not None
    assert loss_fn.temperature == pytest.approx(0.05)


def test_batch_too_small_for_contrastive_loss():
    with pytest.raises(ValueError, match="at least 2 pairs per batch"):
        ContrastiveLoss()(torch.randn(1, 8), torch.randn(1, 8))


def test_lm_loss_only_at_supervised_positions_equals_full_logits_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 1, 2, 3, 4, 5]])
    full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    seen = []
    head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    ours = lm_loss_at_supervised_positions(hidden, labels, head)
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)
    assert seen == [(7, 8)]  # 2 + 5 supervised next tokens, never [batch, seq, vocab]
