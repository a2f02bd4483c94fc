"""cafe.evaluation: metrics on hand-built inputs, runners on stubs and on the tiny checkpoint."""

import importlib.util
import math

import pytest
import torch

from cafe.data import (
    generate_records,
    make_pope_dataset,
    make_synthetic_dataset,
    write_llava_json,
)
from cafe.evaluation import (
    MMEB_IN_DISTRIBUTION,
    MMEB_META_TASKS,
    MMEB_SUBSETS,
    caption_image_index,
    evaluate_mmeb,
    evaluate_modality_gap,
    evaluate_pope,
    evaluate_pope_dataset,
    evaluate_retrieval,
    evaluate_retrieval_dataset,
    generate_answers,
    group_recall_ceiling,
    load_retrieval_data,
    modality_gap,
    parse_yes_no,
    pope_metrics,
    pope_metrics_by_category,
    positive_ranks,
    precision_at_1,
    precision_at_1_per_query,
    project_2d,
    retrieval_recall,
    save_embedding_scatter,
    summarize_mmeb,
)
from cafe.evaluation.modality_gap import IMAGE_COLOUR, TEXT_COLOUR

# ====================================================================== retrieval
# 3 images; captions 0-1 describe image 0, caption 2 image 1, captions 3-4 image 2.
OWNERS = [0, 0, 1, 2, 2]
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.2],  # own image first                       -> t2i rank 0
        [0.5, 0.5, 0.1],  # tie with a negative: counts against    -> rank 1
        [0.3, 0.2, 0.8],  # two negatives above                    -> rank 2
        [0.1, 0.4, 0.4],  # tie with a negative                    -> rank 1
        [0.0, 0.0, 0.7],  #                                        -> rank 0
    ]
)
# image -> text, per image column: image 0's best caption (0.9) is first -> rank 0; image 1's only
# caption (0.2) is beaten by captions 1 (0.5) and 3 (0.4) -> rank 2; image 2's best caption is
# caption 4 (0.7), beaten only by caption 2 (0.8) -> rank 1 (caption 3, at rank 3, does not matter).


def test_recall_on_hand_built_scores_with_ties_and_several_captions():
    metrics = retrieval_recall(SCORES, OWNERS, ks=(1, 2, 3, 10))
    expected = {
        "text_to_image_recall@1": 2 / 5,
        "text_to_image_recall@2": 4 / 5,
        "text_to_image_recall@3": 1.0,
        "text_to_image_recall@10": 1.0,  # K larger than the gallery
        "image_to_text_recall@1": 1 / 3,
        "image_to_text_recall@2": 2 / 3,
        "image_to_text_recall@3": 1.0,
        "image_to_text_recall@10": 1.0,
    }
    assert metrics == pytest.approx(expected)


def test_positive_ranks_hand_computed():
    positives = torch.tensor(OWNERS)[:, None] == torch.arange(3)[None, :]
    assert positive_ranks(SCORES, positives).tolist() == [0, 1, 2, 1, 0]
    assert positive_ranks(SCORES.T, positives.T).tolist() == [0, 2, 1]


def test_positives_tied_with_each_other_do_not_count_against():
    # Image 0's two captions tie at the top: it is a hit at K=1.
    scores = torch.tensor([[0.8, 0.1], [0.8, 0.1], [0.2, 0.9]])
    metrics = retrieval_recall(scores, [0, 0, 1], ks=(1,))
    assert metrics["image_to_text_recall@1"] == 1.0


def test_constant_scores_only_hit_when_k_exceeds_the_negatives():
    scores = torch.zeros(6, 3)  # 3 images, 2 captions each
    metrics = retrieval_recall(scores, [0, 0, 1, 1, 2, 2], ks=(1, 2, 3, 5))
    # t2i: 2 negative images -> rank 2; i2t: 4 negative captions -> rank 4.
    assert [metrics[f"text_to_image_recall@{k}"] for k in (1, 2, 3, 5)] == [0.0, 0.0, 1.0, 1.0]
    assert [metrics[f"image_to_text_recall@{k}"] for k in (1, 2, 3, 5)] == [0.0, 0.0, 0.0, 1.0]


def test_recall_matches_clip_benchmark_topk_on_random_scores():
    # Without ties the rule must agree with CLIP_benchmark's topk-based computation.
    generator = torch.Generator().manual_seed(0)
    owners = torch.arange(20).repeat_interleave(3)  # 20 images x 3 captions
    scores = torch.randn(60, 20, generator=generator)
    positives = owners[:, None] == torch.arange(20)[None, :]
    metrics = retrieval_recall(scores, owners, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i = positives.gather(1, scores.topk(k, dim=1).indices).any(1).float().mean().item()
        i2t = positives.T.gather(1, scores.T.topk(k, dim=1).indices).any(1).float().mean().item()
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(t2i)
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(i2t)


def test_positive_ranks_chunking_gives_the_same_result():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 7, generator=generator)
    positives = torch.rand(50, 7, generator=generator) < 0.3
    positives[:, 0] = True
    assert torch.equal(positive_ranks(scores, positives, chunk_size=3), positive_ranks(scores, positives))


def test_group_recall_hand_computed():
    # SCORES with images 0 and 2 in one group (a duplicate scene).
    groups = ["a", "b", "a"]
    metrics = retrieval_recall(SCORES, OWNERS, ks=(1, 2), image_groups=groups)
    # t2i: caption 0 -> rank 0; 1 -> 1 (ties image 1, of the other group); 2 -> 2; 3 -> 1; 4 -> 0.
    # i2t: image 0's best group caption (0.9) is first -> 0; image 1 loses to captions 1 and 3
    # -> 2; image 2's best group caption (caption 4, 0.7) loses to caption 2 (0.8) -> 1.
    assert metrics == pytest.approx(
        {
            "text_to_image_recall@1": 2 / 5,
            "text_to_image_recall@2": 4 / 5,
            "image_to_text_recall@1": 1 / 3,
            "image_to_text_recall@2": 2 / 3,
        }
    )
    # A caption ranking a same-group image first is a group hit, not an instance hit.
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.1, 0.9, 0.2], [0.9, 0.1, 0.2]])
    instance = retrieval_recall(scores, [0, 1, 2], ks=(1,))
    grouped = retrieval_recall(scores, [0, 1, 2], ks=(1,), image_groups=[("red", 1), ("blue", 2), ("red", 1)])
    assert instance["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert grouped["text_to_image_recall@1"] == 1.0
    # Image 0's best caption is caption 2 (0.9), of its group: a group hit; image 2 likewise.
    assert instance["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert grouped["image_to_text_recall@1"] == 1.0


def test_group_recall_with_singleton_groups_is_instance_recall():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(30, 10, generator=generator)
    owners = torch.arange(10).repeat_interleave(3)
    grouped = retrieval_recall(scores, owners, ks=(1, 5), image_groups=[f"scene-{i}" for i in range(10)])
    assert grouped == retrieval_recall(scores, owners, ks=(1, 5))


def test_group_recall_ceiling():
    # Groups of sizes 2, 1, 1 (images 0 and 3 share one); one caption per image.
    ceiling = group_recall_ceiling(["a", "b", "c", "a"])
    assert ceiling == pytest.approx({"text_to_image_recall@1": 3 / 4, "image_to_text_recall@1": 3 / 4})
    # Image 0 owns 2 captions, image 1 (same group) 1: i2t 2/3 and 1/3; t2i 1/2 for each caption.
    ceiling = group_recall_ceiling(["a", "a", "b"], text_to_image=[0, 0, 1, 2])
    assert ceiling == pytest.approx({"text_to_image_recall@1": (3 * 0.5 + 1) / 4, "image_to_text_recall@1": 2 / 3})
    # The ceiling is what a scene oracle with random tie-breaking scores on average.
    groups = [i % 4 for i in range(12)]
    owners = torch.arange(12).repeat_interleave(2)
    oracle = (torch.tensor(groups)[owners][:, None] == torch.tensor(groups)[None, :]).float()
    generator = torch.Generator().manual_seed(0)
    runs = [
        retrieval_recall(oracle + 1e-3 * torch.rand(oracle.shape, generator=generator), owners, ks=(1,))
        for _ in range(400)
    ]
    expected = group_recall_ceiling(groups, owners)
    for key in expected:
        assert sum(r[key] for r in runs) / len(runs) == pytest.approx(expected[key], abs=0.03)
    with pytest.raises(ValueError):
        group_recall_ceiling([])
    with pytest.raises(ValueError):
        retrieval_recall(SCORES, OWNERS, image_groups=["a", "b"])


def test_caption_image_index():
    captions, owners = caption_image_index([["a", "b"], "c", ["d"]])
    assert captions == ["a", "b", "c", "d"] and owners.tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: retrieval_recall(SCORES, OWNERS, ks=(0,)), ValueError),
        (lambda: retrieval_recall(SCORES, OWNERS, ks=()), ValueError),
        (lambda: retrieval_recall(SCORES, OWNERS, ks=(1.5,)), TypeError),
        (lambda: retrieval_recall(SCORES, OWNERS[:-1]), ValueError),
        (lambda: retrieval_recall(SCORES, [0, 0, 0, 0, 0]), ValueError),  # images 1, 2 uncaptioned
        (lambda: retrieval_recall(SCORES, [0, 0, 1, 2, 3]), ValueError),  # index out of range
        (lambda: retrieval_recall(torch.empty(0, 3), []), ValueError),
        (lambda: retrieval_recall(torch.tensor([[float("nan")]]), [0]), ValueError),
        (lambda: caption_image_index([]), ValueError),
        (lambda: caption_image_index([["a"], []]), ValueError),
    ],
)
def test_retrieval_bad_input(call, error):
    with pytest.raises(error):
        call()


class KeywordEncoder:
    """Stands in for a model: embeds by looking up which known word an input mentions.

    An image is recognised by its pixel colour (synthetic images) or its file name.
    """

    def __init__(self, words):
        self.words = list(words)
        self.calls = []

    def vector(self, image=None, text=None):
        from cafe.data.synthetic import DEFAULT_COLOURS

        probe = (text or "").lower()
        if image is not None:
            if isinstance(image, str):
                probe = image.rsplit("/", 1)[-1] + " " + probe
            else:
                colours = {rgb: name for name, rgb in DEFAULT_COLOURS.items()}
                probe = " ".join(colours.get(rgb, "") for _, rgb in image.getcolors()) + " " + probe
        hits = [i for i, w in enumerate(self.words) if w in probe]
        v = torch.zeros(len(self.words) + 1)
        v[hits[0] if hits else -1] = 1.0
        return v

    def encode(self, inputs=None, *, images=None, texts=None, batch_size=16, show_progress_bar=None, **kwargs):
        if inputs is None:
            inputs = [{"image": i} for i in images] if images is not None else [{"text": t} for t in texts]
        self.calls.append(list(inputs))
        return torch.stack([self.vector(i.get("image"), i.get("text")) for i in inputs])


def test_evaluate_retrieval_plumbing_with_a_stub_encoder():
    from PIL import Image

    red, blue, green = (
        Image.new("RGB", (8, 8), (220, 30, 30)),
        Image.new("RGB", (8, 8), (30, 70, 220)),
        Image.new("RGB", (8, 8), (30, 160, 50)),
    )
    encoder = KeywordEncoder(["red", "blue", "green"])
    # Image 2 ("green") gets a caption that mentions "blue": a t2i miss at K=1. For i2t, image 0
    # hits; image 1's caption ties with image 2's "blue again" (a tie counts against); image 2's
    # caption scores 0 like every other caption.
    result = evaluate_retrieval(
        encoder, [red, blue, green], [["a red one", "red"], ["blue"], ["blue again"]], ks=(1, 3, 4)
    )
    assert result["num_images"] == 3 and result["num_captions"] == 4
    assert result["text_to_image_recall@1"] == pytest.approx(3 / 4)
    assert result["image_to_text_recall@1"] == pytest.approx(1 / 3)
    # K = 3 covers the whole image gallery but not the 3 negative captions of image 2.
    assert result["text_to_image_recall@3"] == 1.0
    assert result["image_to_text_recall@3"] == pytest.approx(2 / 3)
    assert result["image_to_text_recall@4"] == 1.0


def test_evaluate_retrieval_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        evaluate_retrieval(KeywordEncoder(["x"]), [None, None], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        evaluate_retrieval(KeywordEncoder(["x"]), [], [])


def test_evaluate_retrieval_dataset_with_a_colour_oracle():
    data = make_synthetic_dataset(num_train=2, num_test=10, seed=4, num_captions=3)
    encoder = KeywordEncoder(["red", "blue", "green", "yellow", "orange", "purple"])
    result = evaluate_retrieval_dataset(
        encoder, data, split="test", captions_column="captions", max_images=6, ks=(1, 6)
    )
    assert result["num_images"] == 6 and result["num_captions"] == 18
    # An oracle that sees only colour ties every image with the others of its colour; ties count
    # against, so exactly the images of a colour seen once are found at K=1, in both directions.
    colours = [data["test"][i]["attributes"]["colour"] for i in range(6)]
    unique = sum(colours.count(c) == 1 for c in colours) / 6
    assert 0 < unique < 1  # the seed gives both cases
    assert result["text_to_image_recall@1"] == pytest.approx(unique)
    assert result["image_to_text_recall@1"] == pytest.approx(unique)
    assert result["text_to_image_recall@6"] == 1.0


def test_load_retrieval_data_from_llava_json_with_filter(tmp_path):
    records = generate_records(5, split="test", num_captions=2)
    path = write_llava_json(records, tmp_path, split="test")
    images, captions = load_retrieval_data(path, captions_column="captions", where={"id": "test-000003"})
    assert images == ["images/test/test-000003.png"] and captions == [records[3]["captions"]]
    with pytest.raises(KeyError, match="captions"):
        load_retrieval_data(path, captions_column="sentences")


def test_evaluate_retrieval_on_tiny_checkpoint(cafe_model, tmp_path):
    records = generate_records(6, num_captions=2)
    path = write_llava_json(records, tmp_path, split="test")
    result = evaluate_retrieval_dataset(
        cafe_model, path, captions_column="captions", image_root=tmp_path, batch_size=4, ks=(1, 5, 10)
    )
    assert result["num_images"] == 6 and result["num_captions"] == 12
    for key in ("text_to_image_recall@1", "image_to_text_recall@5"):
        assert 0.0 <= result[key] <= 1.0
    # 10 > 6 images and > 10 negative captions: every query is a hit whatever the model.
    assert result["text_to_image_recall@10"] == result["image_to_text_recall@10"] == 1.0
    # The same numbers as embedding by hand.
    images = cafe_model.encode(images=[r["image"] for r in records])
    texts = cafe_model.encode(texts=[c for r in records for c in r["captions"]])
    by_hand = retrieval_recall(texts @ images.T, [i for i in range(6) for _ in range(2)])
    assert {k: result[k] for k in by_hand} == pytest.approx(by_hand, abs=1e-6)


# ====================================================================== MMEB
def test_precision_at_1_on_a_score_matrix_with_a_tie():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.5, 0.1], [0.4, 0.4, 0.0], [0.2, 0.1, 0.19]])
    assert precision_at_1_per_query(scores).tolist() == [True, False, False, True]
    assert precision_at_1(scores) == pytest.approx(0.5)


def test_precision_at_1_on_ragged_candidate_lists():
    scores = [torch.tensor([0.5]), torch.tensor([0.2, 0.1, 0.3]), torch.tensor([0.7, 0.6])]
    assert precision_at_1(scores) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        precision_at_1([])
    with pytest.raises(ValueError):
        precision_at_1([torch.tensor([])])


def test_mmeb_tables():
    assert {task: len(names) for task, names in MMEB_META_TASKS.items()} == {
        "Classification": 10,
        "VQA": 10,
        "Retrieval": 12,
        "Visual Grounding": 4,
    }
    assert len(set(MMEB_SUBSETS)) == 36 and len(MMEB_IN_DISTRIBUTION) == 20
    assert MMEB_IN_DISTRIBUTION <= set(MMEB_SUBSETS)


def test_summarize_mmeb_hand_computed():
    summary = summarize_mmeb({"ImageNet-1K": 0.5, "Place365": 0.3, "OK-VQA": 0.8, "MSCOCO": 0.2, "my-subset": 1.0})
    assert summary["per_meta_task"] == pytest.approx(
        {"Classification": 0.4, "VQA": 0.8, "Visual Grounding": 0.2, "Other": 1.0}
    )
    assert summary["in_distribution"] == pytest.approx(0.5)  # ImageNet-1K, OK-VQA, MSCOCO
    assert summary["out_of_distribution"] == pytest.approx(0.3)  # Place365
    assert summary["overall"] == pytest.approx(0.56)
    with pytest.raises(ValueError):
        summarize_mmeb({})


MMEB_ROWS = [
    # image + instruction query, text candidates: positive "red" wins -> hit.
    {
        "qry_text": "<|image_1|>\nWhat colour is it?",
        "qry_img_path": "imgs/red.png",
        "tgt_text": ["red", "blue", "green"],
        "tgt_img_path": ["", "", ""],
    },
    # the positive "green" loses to "blue" -> miss.
    {
        "qry_text": "<|image_1|>\nWhat colour is it?",
        "qry_img_path": "imgs/blue.png",
        "tgt_text": ["green", "blue"],
        "tgt_img_path": ["", ""],
    },
    # text query, image-only candidates with VLM2Vec's "" for tgt_text -> hit.
    {
        "qry_text": "find the green one",
        "qry_img_path": "",
        "tgt_text": "",
        "tgt_img_path": ["imgs/green.png", "imgs/red.png"],
    },
]


def test_evaluate_mmeb_with_a_stub_encoder(tmp_path):
    encoder = KeywordEncoder(["red", "blue", "green"])
    summary = evaluate_mmeb(encoder, {"VOC2007": MMEB_ROWS, "OVEN": MMEB_ROWS[:1]}, image_root=tmp_path)
    assert summary["per_subset"] == pytest.approx({"VOC2007": 2 / 3, "OVEN": 1.0})
    assert summary["per_meta_task"] == pytest.approx({"Classification": 2 / 3, "Retrieval": 1.0})
    items = encoder.calls[0]  # one encode call per subset
    # Phi-3's image marker is stripped, paths are joined to image_root, duplicates embedded once.
    assert {"image": str(tmp_path / "imgs/red.png"), "text": "What colour is it?"} in items
    assert all("<|image_1|>" not in item.get("text", "") for item in items)
    assert sum(item == {"text": "red"} for item in items) == 1
    assert len(items) == 2 + 1 + 3 + 2  # 2 image queries + 1 text query, 3 texts, 2 images


def test_evaluate_mmeb_on_tiny_checkpoint(cafe_model, tmp_path):
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 70, 220)), ("green", (30, 160, 50))):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        from PIL import Image

        Image.new("RGB", (32, 32), rgb).save(tmp_path / "imgs" / f"{name}.png")
    import datasets

    summary = evaluate_mmeb(
        cafe_model, {"toy": datasets.Dataset.from_list(MMEB_ROWS[:2])}, image_root=tmp_path, batch_size=4
    )
    assert set(summary) == {"per_subset", "per_meta_task", "overall"}
    assert summary["per_subset"]["toy"] in (0.0, 0.5, 1.0)


# ====================================================================== POPE
@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes.", "yes"),
        ("yes, there is", "yes"),
        ("YES", "yes"),
        ("Yeah", "yes"),
        ("Correct.", "yes"),
        ("There is a red circle in the image.", "yes"),
        ("There's a circle.", "yes"),
        ("The image shows a blue square", "yes"),
        ("I think so", "yes"),
        ("Yes there is a cat. No wait", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Nope", "no"),
        ("No. But there is a square.", "no"),
        ("There is no blue square in the image.", "no"),
        ("I don't think so.", "no"),
        ("I don\u2019t think so", "no"),
        ("There isn't one", "no"),
        ("It is not in the image", "no"),
        ("Definitely not", "no"),
        ("Not really", "no"),
        ("", "other"),
        ("   ", "other"),
        (None, "other"),
        ("...", "other"),
        ("I'm not sure.", "other"),
        ("Maybe", "other"),
        ("No idea", "other"),
        ("I can't tell", "other"),
        ("banana", "other"),
    ],
)
def test_parse_yes_no(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_hand_computed():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["Yes", "no", "I'm not sure", "No", "Yes.", "no"]
    # parsed: yes no other no yes no -> TP 1, TN 2, FP 1, predicted yes 2, true yes 3.
    metrics = pope_metrics(answers, labels)
    assert metrics == pytest.approx(
        {
            "accuracy": 3 / 6,
            "precision": 1 / 2,
            "recall": 1 / 3,
            "f1": 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3),
            "yes_ratio": 2 / 6,
            "other_ratio": 1 / 6,
            "num_questions": 6,
        }
    )


def test_pope_always_yes_matches_paper_table6_row():
    # MultiModal-GPT in Table 6 answers "yes" to everything: 50.0 / 50.0 / 100.0 / 66.7 / 100.0.
    metrics = pope_metrics(["Yes"] * 10, [True] * 5 + [False] * 5)
    assert [round(100 * metrics[k], 1) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == [
        50.0,
        50.0,
        100.0,
        66.7,
        100.0,
    ]


def test_pope_never_yes_has_zero_precision_not_a_crash():
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.0 and metrics["accuracy"] == 0.5


def test_pope_by_category_averages_the_splits():
    result = pope_metrics_by_category(
        ["yes", "no", "yes", "yes"], ["yes", "no", "yes", "no"], ["random", "random", "adversarial", "adversarial"]
    )
    assert result["random"]["accuracy"] == 1.0 and result["adversarial"]["accuracy"] == 0.5
    assert result["average"]["accuracy"] == pytest.approx(0.75)
    assert result["average"]["f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert result["all"]["num_questions"] == 4


@pytest.mark.parametrize(
    ("answers", "labels"),
    [([], []), (["yes"], ["yes", "no"]), (["yes"], ["maybe"])],
)
def test_pope_bad_input(answers, labels):
    with pytest.raises(ValueError):
        pope_metrics(answers, labels)


class StubGenerator:
    """A model whose ``generate`` answers "Yes" when the prompt names "red", else "No".

    It uses the real tiny processor, so the prompt rendering and the padding are the real ones.
    """

    device = torch.device("cpu")
    dtype = torch.float32
    training = False

    def __init__(self, processor):
        self.processor = processor
        self.seen = []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, **vision):
        tokenizer = self.processor.tokenizer
        assert do_sample is False and "pixel_values" in vision
        self.seen.append((input_ids, attention_mask))
        prompts = tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        answers = [tokenizer("Yes" if "red" in p else "No", add_special_tokens=False).input_ids for p in prompts]
        width = max(map(len, answers)) + 1
        new = [a + [tokenizer.eos_token_id] * (width - len(a)) for a in answers]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_generate_answers_left_pads_renders_the_chat_template_and_restores_padding(tiny_checkpoint, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = StubGenerator(processor)
    questions = ["Is there a red square in the image?", "Is there a blue circle?", "red?"]
    answers = generate_answers(model, list(images), questions, batch_size=3, show_progress_bar=False)
    assert answers == ["Yes", "No", "Yes"]
    assert processor.tokenizer.padding_side == "right"
    input_ids, attention_mask = model.seen[0]
    assert attention_mask[:, -1].all() and not attention_mask[:, 0].all()  # left padding
    prompt = processor.tokenizer.decode(input_ids[2][attention_mask[2].bool()])
    assert prompt.endswith(
        "red?\nAnswer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_start|>user\n<image>" in prompt


def test_evaluate_pope_with_stub_scores_per_category(tiny_checkpoint):
    from transformers import AutoProcessor

    records = generate_records(4)
    pope = make_pope_dataset(records)
    model = StubGenerator(AutoProcessor.from_pretrained(tiny_checkpoint))
    result = evaluate_pope_dataset(model, pope, batch_size=5, show_progress_bar=False)
    # Hand-check against the stub's rule: "yes" iff the question names red.
    predicted = ["yes" if "red" in q else "no" for q in pope["question"]]
    expected = pope_metrics(predicted, pope["answer"])
    assert result["all"] == pytest.approx(expected)
    assert set(result) == {"random", "popular", "adversarial", "average", "all", "answers"}
    assert len(result["answers"]) == 24


def test_evaluate_pope_rejects_bad_labels_before_generating(cafe_model, images):
    with pytest.raises(ValueError, match="Label 0"):
        evaluate_pope(cafe_model, images[:1], ["Is there a cat?"], ["perhaps"])


def test_evaluate_pope_on_tiny_checkpoint(cafe_model):
    pope = make_pope_dataset(generate_records(2))
    result = evaluate_pope_dataset(cafe_model, pope, batch_size=6, max_new_tokens=3, show_progress_bar=False)
    assert len(result["answers"]) == 12 and all(isinstance(a, str) for a in result["answers"])
    metrics = result["average"]
    assert metrics["num_questions"] == 12
    assert metrics["yes_ratio"] + metrics["other_ratio"] <= 1.0
    # Every question was parsed into exactly one of yes / no / other.
    parsed = [parse_yes_no(a) for a in result["answers"]]
    assert result["all"]["yes_ratio"] == parsed.count("yes") / 12
    assert cafe_model.processor.tokenizer.padding_side == "right"


# ====================================================================== modality gap
def test_modality_gap_of_constructed_embeddings():
    a = 0.3
    e = torch.eye(3)
    images = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[2], math.cos(a) * e[0] - math.sin(a) * e[2]])
    texts = torch.stack([math.cos(a) * e[1] + math.sin(a) * e[2], math.cos(a) * e[1] - math.sin(a) * e[2]])
    # Centroids cos(a) e0 and cos(a) e1 -> distance sqrt(2) cos(a).
    assert modality_gap(images, texts) == pytest.approx(math.sqrt(2) * math.cos(a), abs=1e-6)
    # Rows are normalised first, so scaling changes nothing.
    assert modality_gap(5 * images, 0.1 * texts) == pytest.approx(math.sqrt(2) * math.cos(a), abs=1e-6)
    assert modality_gap(images, images.flip(0)) == pytest.approx(0.0, abs=1e-6)
    assert modality_gap(e[:1], -e[:1]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("images", "texts"),
    [(torch.empty(0, 3), torch.ones(2, 3)), (torch.ones(2, 3), torch.ones(2, 4)), (torch.ones(3), torch.ones(3))],
)
def test_modality_gap_bad_input(images, texts):
    with pytest.raises(ValueError):
        modality_gap(images, texts)


def test_pca_projection_is_exact_and_deterministic():
    direction = torch.tensor([1.0, 2.0, 2.0]) / 3
    points = torch.tensor([[-2.0], [0.0], [1.0], [4.0]]) * direction  # on a line
    coords, method = project_2d(points, method="pca")
    assert method == "pca" and coords.shape == (4, 2)
    # Distances along the line are kept, the second axis is empty.
    assert torch.allclose(coords[:, 1], torch.zeros(4), atol=1e-5)
    assert torch.allclose((coords[:, 0] - coords[0, 0]).abs(), torch.tensor([0.0, 2.0, 3.0, 6.0]), atol=1e-5)
    assert torch.equal(project_2d(points, method="pca")[0], coords)
    expected_auto = "umap" if importlib.util.find_spec("umap") else "pca"
    assert project_2d(torch.randn(8, 4), method="auto")[1] == expected_auto
    with pytest.raises(ValueError):
        project_2d(points, method="tsne")


def test_scatter_png_shows_both_modalities(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 8, generator=generator) + 3 * torch.eye(8)[0]
    texts = torch.randn(20, 8, generator=generator) - 3 * torch.eye(8)[0]
    result = save_embedding_scatter(images, texts, tmp_path / "plots" / "gap.png", method="pca", size=256)
    assert result["method"] == "pca" and result["image_coords"].shape == (20, 2)
    assert result["modality_gap"] == pytest.approx(modality_gap(images, texts))
    with Image.open(result["path"]) as picture:
        assert picture.size == (256, 256)
        colours = {rgb for _, rgb in picture.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert IMAGE_COLOUR in colours and TEXT_COLOUR in colours
    # PCA's first axis separates the two clouds: all image points on one side.
    x_img, x_txt = result["image_coords"][:, 0], result["text_coords"][:, 0]
    assert x_img.min() > x_txt.max() or x_img.max() < x_txt.min()


def test_evaluate_modality_gap_on_tiny_checkpoint(cafe_model, tmp_path):
    records = generate_records(5)
    result = evaluate_modality_gap(
        cafe_model,
        [r["image"] for r in records],
        [r["caption"] for r in records],
        plot_path=tmp_path / "gap.png",
        method="pca",
    )
    assert result["num_pairs"] == 5 and result["projection"] == "pca" and result["plot_path"].is_file()
    images = cafe_model.encode(images=[r["image"] for r in records])
    texts = cafe_model.encode(texts=[r["caption"] for r in records])
    assert result["modality_gap"] == pytest.approx(modality_gap(images, texts), abs=1e-6)
    assert 0.0 < result["modality_gap"] <= 2.0
    with pytest.raises(ValueError, match="same length"):
        evaluate_modality_gap(cafe_model, [records[0]["image"]], ["a", "b"])
