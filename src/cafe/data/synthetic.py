"""A deterministic synthetic image-caption data set: coloured shapes on a plain background.

(Short clips of one moving shape, the video counterpart, are in `cafe.data.synthetic_clips`.)

Every image holds one group of identical shapes (1-3 of them), so a short caption describes it
exactly::

    "two large red circles on the left"

Because the ground truth is known, the same records serve contrastive training (image + caption,
several paraphrased captions per image), LLaVA-style instruction tuning (a description turn plus
question-answer turns) and POPE-style hallucination probes (balanced yes/no questions about
present and absent objects). It needs nothing but PIL, so tests, demos and smoke runs of the
training and evaluation code work offline.

Determinism: sample ``i`` of split ``s`` under seed ``k`` is drawn from its own
``random.Random("cafe-synthetic/k/s/i")`` (string seeds are hashed with SHA-512, so they are
stable across processes and Python versions), and PIL draws without anti-aliasing, so the same
seed gives byte-identical images and identical text, independently of how many samples are asked
for.

Main entry points:

* `generate_records` -> a list of plain dicts (PIL image included);
* `make_synthetic_dataset` -> a `datasets.DatasetDict` with ``train`` and ``test`` splits;
* `write_llava_json` / `write_synthetic_dataset` -> LLaVA-layout JSON files plus an image folder;
* `make_pope_dataset` -> one row per yes/no question (the ``lmms-lab/POPE`` column layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features
    from PIL import Image

# Saturated colours far apart in RGB, so a pixel identifies its colour unambiguously. The weights
# make some objects more frequent than others, which gives POPE's "popular" negatives a meaning.
DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (30, 160, 50),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 170),
}
DEFAULT_COLOUR_WEIGHTS: dict[str, float] = {
    "red": 0.25,
    "blue": 0.22,
    "green": 0.18,
    "yellow": 0.14,
    "orange": 0.11,
    "purple": 0.10,
}
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_SHAPE_WEIGHTS: dict[str, float] = {"circle": 0.4, "square": 0.35, "triangle": 0.25}
# Side of one shape's bounding box as a fraction of the image side.
DEFAULT_SIZES: dict[str, float] = {"small": 0.14, "large": 0.22}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_SIZE_SYNONYMS = {"small": "little", "large": "big"}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_WHERE_ALT = {
    "left": "in the left part of the image",
    "right": "in the right part of the image",
    "top": "in the upper part of the image",
    "bottom": "in the lower part of the image",
    "center": "in the middle of the image",
}
# Where a group is centred (fractions of width, height) and whether it is laid out as a row or a
# column: columns on the sides, rows elsewhere, so three large shapes always fit in a 64 px image.
_ANCHORS = {
    "left": (0.2, 0.5, "column"),
    "right": (0.8, 0.5, "column"),
    "top": (0.5, 0.2, "row"),
    "bottom": (0.5, 0.8, "row"),
    "center": (0.5, 0.5, "row"),
}
# Centre-to-centre distance between neighbouring shapes, in shape sizes (leaves a visible gap).
_SPACING = 1.35

HUMAN_DESCRIBE_PROMPT = "<image>\nDescribe the picture."
POPE_CATEGORIES = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class SyntheticShapesConfig:
    """What the generator draws.

    Args:
        image_size: Side of the square images in pixels.
        background: RGB of the plain background (must differ from every shape colour).
        colours: Colour name -> RGB.
        colour_weights: Colour name -> sampling weight (missing names: weight 1); ``None``: uniform.
        shapes: Shape names, a subset of ``("circle", "square", "triangle")``.
        shape_weights: Shape name -> sampling weight; ``None``: uniform.
        sizes: Size name -> side of a shape's box as a fraction of ``image_size``.
        positions: Where groups may be placed, a subset of `POSITIONS`.
        max_count: Largest number of shapes in a group (1 to 3).
        num_captions: Captions per image: the canonical one first, then distinct paraphrases
            (at most ``len(CAPTION_TEMPLATES)``).
        qa_turns: Add question-answer turns after the description turn of the conversations.
        jitter: Largest random shift of a group, in pixels; ``None``: ``image_size // 32``.
    """

    image_size: int = 64
    background: tuple[int, int, int] = (255, 255, 255)
    colours: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    colour_weights: Mapping[str, float] | None = field(default_factory=lambda: dict(DEFAULT_COLOUR_WEIGHTS))
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    shape_weights: Mapping[str, float] | None = field(default_factory=lambda: dict(DEFAULT_SHAPE_WEIGHTS))
    sizes: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    positions: tuple[str, ...] = POSITIONS
    max_count: int = 3
    num_captions: int = 1
    qa_turns: bool = True
    jitter: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}.")
        unknown = set(self.shapes) - set(DEFAULT_SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {DEFAULT_SHAPES}, got {self.shapes}.")
        unknown = set(self.positions) - set(POSITIONS)
        if unknown or not self.positions:
            raise ValueError(f"positions must be a non-empty subset of {POSITIONS}, got {self.positions}.")
        if not self.colours or not self.sizes:
            raise ValueError("colours and sizes must not be empty.")
        if tuple(self.background) in {tuple(rgb) for rgb in self.colours.values()}:
            raise ValueError("The background colour equals a shape colour; shapes would be invisible.")
        if not 1 <= self.max_count <= 3:
            raise ValueError(f"max_count must be 1, 2 or 3, got {self.max_count}.")
        if not 1 <= self.num_captions <= len(CAPTION_TEMPLATES):
            raise ValueError(f"num_captions must be between 1 and {len(CAPTION_TEMPLATES)}, got {self.num_captions}.")
        for name, fraction in self.sizes.items():
            # Three shapes in a row must fit in the image (see _ANCHORS / _SPACING).
            if not 0.05 <= fraction <= 0.25:
                raise ValueError(f"size {name!r} must be a fraction of the image side in [0.05, 0.25], got {fraction}.")

    @property
    def objects(self) -> list[tuple[str, str]]:
        """Every (colour, shape) object the generator can draw, most frequent first."""
        return sorted(
            ((c, s) for c in self.colours for s in self.shapes),
            key=lambda obj: -_weight(self.colour_weights, obj[0]) * _weight(self.shape_weights, obj[1]),
        )


def _weight(weights: Mapping[str, float] | None, name: str) -> float:
    return 1.0 if weights is None else float(weights.get(name, 1.0))


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: a group of ``count`` identical shapes."""

    shape: str
    colour: str
    size: str
    position: str
    count: int

    # -------------------------------------------------------------- wording
    @property
    def noun(self) -> str:
        return self.shape if self.count == 1 else self.shape + "s"

    @property
    def object_name(self) -> str:
        """The POPE object: ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    def caption(self, template: int = 0) -> str:
        """One of the `CAPTION_TEMPLATES`, filled in (template 0 is the canonical caption)."""
        be = "is" if self.count == 1 else "are"
        article_or_count = "a" if self.count == 1 else COUNT_WORDS[self.count]
        text = CAPTION_TEMPLATES[template].format(
            count=article_or_count,
            digit=self.count,
            be=be,
            size=self.size,
            size_alt=_SIZE_SYNONYMS.get(self.size, self.size),
            colour=self.colour,
            noun=self.noun,
            where=_WHERE[self.position],
            where_alt=_WHERE_ALT[self.position],
        )
        return _fix_articles(text)

    def questions(self) -> list[tuple[str, str]]:
        """Question-answer pairs whose answers follow from the scene (one word or phrase)."""
        one = self.count == 1
        return [
            ("What colour is the shape?" if one else "What colour are the shapes?", self.colour),
            ("What shape is it?" if one else "What shape are they?", self.shape),
            ("How many shapes are there?", COUNT_WORDS[self.count]),
            ("Where is the shape?" if one else "Where are the shapes?", _WHERE[self.position]),
            ("Is the shape small or large?" if one else "Are the shapes small or large?", self.size),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fix_articles(text: str) -> str:
    """``"a orange ..."`` -> ``"an orange ..."`` (the article depends on the word that follows)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# Paraphrases for retrieval with several captions per image. Each one states every attribute, so
# any of them identifies the scene; template 0 is the canonical caption.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{count} {size} {colour} {noun} {where}",
    "there {be} {count} {size} {colour} {noun} {where}",
    "a picture of {count} {size} {colour} {noun} {where}",
    "{digit} {size_alt} {colour} {noun} {where_alt}",
    "{count} {colour} {noun} of {size} size {where}",
    "a plain background with {count} {size} {colour} {noun} {where}",
)


# ------------------------------------------------------------------ sampling and drawing
def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, hence stable across runs and platforms.
    return random.Random(f"cafe-synthetic/{seed}/{split}/{index}")


def _choose(rng: random.Random, names: Sequence[str], weights: Mapping[str, float] | None) -> str:
    names = list(names)
    return rng.choices(names, weights=[_weight(weights, n) for n in names], k=1)[0]


def sample_scene(rng: random.Random, config: SyntheticShapesConfig) -> Scene:
    """Draw the attributes of one scene."""
    return Scene(
        shape=_choose(rng, config.shapes, config.shape_weights),
        colour=_choose(rng, list(config.colours), config.colour_weights),
        size=rng.choice(list(config.sizes)),
        position=rng.choice(list(config.positions)),
        count=rng.randint(1, config.max_count),
    )


def layout_boxes(scene: Scene, config: SyntheticShapesConfig, rng: random.Random) -> list[list[int]]:
    """Bounding boxes ``[x0, y0, x1, y1]`` (inclusive pixel coordinates) of the scene's shapes."""
    n = config.image_size
    side = max(4, round(config.sizes[scene.size] * n))
    step = round(side * _SPACING)
    fx, fy, direction = _ANCHORS[scene.position]
    jitter = config.jitter if config.jitter is not None else max(1, n // 32)
    cx = round(fx * n) + rng.randint(-jitter, jitter)
    cy = round(fy * n) + rng.randint(-jitter, jitter)
    boxes = []
    for i in range(scene.count):
        offset = round((i - (scene.count - 1) / 2) * step)
        x, y = (cx + offset, cy) if direction == "row" else (cx, cy + offset)
        x0, y0 = x - side // 2, y - side // 2
        # Clamp rather than fail: only reachable with a large jitter.
        x0 = min(max(x0, 0), n - side)
        y0 = min(max(y0, 0), n - side)
        boxes.append([x0, y0, x0 + side - 1, y0 + side - 1])
    return boxes


def shape_interior_point(shape: str, box: Sequence[int]) -> tuple[int, int]:
    """A pixel that is certainly painted with the shape's colour (centre, or centroid of a triangle)."""
    x0, y0, x1, y1 = box
    cx = (x0 + x1) // 2
    if shape == "triangle":
        # Apex up: the centroid lies two thirds of the way down from the apex.
        return cx, y0 + (2 * (y1 - y0)) // 3
    return cx, (y0 + y1) // 2


def draw_scene(scene: Scene, boxes: Sequence[Sequence[int]], config: SyntheticShapesConfig) -> Image.Image:
    """Render the scene as an RGB PIL image (no anti-aliasing, so colours are exact)."""
    return draw_shapes(scene.shape, config.colours[scene.colour], boxes, config.image_size, config.background)


def draw_shapes(
    shape: str, rgb: Sequence[int], boxes: Sequence[Sequence[int]], image_size: int, background: Sequence[int]
) -> Image.Image:
    """``shape`` filled with ``rgb`` in each box on a plain square image (also the clips' frames)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), tuple(background))
    draw = ImageDraw.Draw(image)
    fill = tuple(rgb)
    for x0, y0, x1, y1 in boxes:
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def pope_questions(scene: Scene, config: SyntheticShapesConfig, rng: random.Random) -> list[dict[str, str]]:
    """Balanced POPE-style questions: for each category one present and one absent object.

    Negatives follow POPE's three splits: ``random`` (any absent object), ``popular`` (one of the
    three most frequent absent objects under the sampling weights) and ``adversarial`` (an absent
    object sharing the shape or the colour of the present one, the easiest to confuse).
    """
    present = (scene.colour, scene.shape)
    absent = [obj for obj in config.objects if obj != present]
    if not absent:
        raise ValueError("POPE questions need at least two possible objects (colours x shapes).")
    related = [obj for obj in absent if obj[0] == present[0] or obj[1] == present[1]]
    negatives = {
        "random": rng.choice(absent),
        "popular": rng.choice(absent[:3]),
        "adversarial": rng.choice(related or absent),
    }
    rows = []
    for category in POPE_CATEGORIES:
        for (colour, shape), answer in ((present, "yes"), (negatives[category], "no")):
            rows.append(
                {
                    "question": _fix_articles(f"Is there a {colour} {shape} in the image?"),
                    "answer": answer,
                    "category": category,
                    "object": f"{colour} {shape}",
                }
            )
    return rows


def conversations_for(scene: Scene, config: SyntheticShapesConfig) -> list[dict[str, str]]:
    """LLaVA-style turns: a description request answered by the caption, then optional QA turns."""
    turns = [{"from": "human", "value": HUMAN_DESCRIBE_PROMPT}, {"from": "gpt", "value": scene.caption(0)}]
    if config.qa_turns:
        for question, answer in scene.questions():
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def make_record(seed: int, split: str, index: int, config: SyntheticShapesConfig) -> dict[str, Any]:
    """One sample: image, captions, attributes, boxes, conversations and POPE questions."""
    rng = _sample_rng(seed, split, index)
    scene = sample_scene(rng, config)
    boxes = layout_boxes(scene, config, rng)
    templates = [0] + rng.sample(range(1, len(CAPTION_TEMPLATES)), config.num_captions - 1)
    captions = [scene.caption(t) for t in templates]
    return {
        "id": f"{split}-{index:06d}",
        "image": draw_scene(scene, boxes, config),
        "caption": captions[0],
        "captions": captions,
        "attributes": scene.to_dict(),
        "boxes": boxes,
        "conversations": conversations_for(scene, config),
        "pope": pope_questions(scene, config, rng),
    }


def _config(config: SyntheticShapesConfig | None, overrides: Mapping[str, Any]) -> SyntheticShapesConfig:
    config = config if config is not None else SyntheticShapesConfig()
    return dataclasses.replace(config, **overrides) if overrides else config


def generate_records(
    num_samples: int,
    seed: int = 0,
    split: str = "train",
    config: SyntheticShapesConfig | None = None,
    **config_overrides: Any,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` records of one split.

    Args:
        num_samples: How many records.
        seed: Master seed; the same (seed, split, index) always gives the same record.
        split: Split name; also the id prefix (``"train-000003"``) and part of the sample seed, so
            train and test draw different samples.
        config: Generator settings; keyword overrides (``num_captions=5``, ``image_size=96``, ...)
            are applied on top.

    Returns:
        A list of dicts with keys ``id``, ``image`` (RGB PIL image), ``caption`` (canonical),
        ``captions`` (``num_captions`` strings, canonical first), ``attributes`` (shape, colour,
        size, position, count), ``boxes`` (``count`` boxes ``[x0, y0, x1, y1]``, inclusive),
        ``conversations`` (LLaVA turns) and ``pope`` (6 yes/no questions, 3 yes and 3 no).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    config = _config(config, config_overrides)
    return [make_record(seed, split, index, config) for index in range(num_samples)]


# ------------------------------------------------------------------ datasets / JSON
def _features() -> Features:
    from datasets import Features, Image, Value

    # Plain Python lists declare list features in every datasets version.
    return Features(
        {
            "id": Value("string"),
            "image": Image(),
            "caption": Value("string"),
            "captions": [Value("string")],
            "attributes": {
                "shape": Value("string"),
                "colour": Value("string"),
                "size": Value("string"),
                "position": Value("string"),
                "count": Value("int32"),
            },
            "boxes": [[Value("int32")]],
            "conversations": [{"from": Value("string"), "value": Value("string")}],
            "pope": [
                {
                    "question": Value("string"),
                    "answer": Value("string"),
                    "category": Value("string"),
                    "object": Value("string"),
                }
            ],
        }
    )


def records_to_dataset(records: Sequence[Mapping[str, Any]]) -> Dataset:
    """A `datasets.Dataset` of records from `generate_records` (``image`` as an Image feature)."""
    from datasets import Dataset

    return Dataset.from_list([dict(r) for r in records], features=_features())


def make_synthetic_dataset(
    num_train: int = 256,
    num_test: int = 64,
    seed: int = 0,
    config: SyntheticShapesConfig | None = None,
    **config_overrides: Any,
) -> DatasetDict:
    """A `datasets.DatasetDict` with ``train`` and ``test`` splits of synthetic records.

    See `generate_records` for the columns. The splits draw from different sample seeds; they
    are not guaranteed to be disjoint in attributes (there are only a few hundred distinct scenes).
    """
    from datasets import DatasetDict

    config = _config(config, config_overrides)
    return DatasetDict(
        {
            split: records_to_dataset(generate_records(n, seed=seed, split=split, config=config))
            for split, n in (("train", num_train), ("test", num_test))
        }
    )


def make_pope_dataset(records: Iterable[Mapping[str, Any]]) -> Dataset:
    """One row per POPE question, in the ``lmms-lab/POPE`` layout.

    Columns: ``question_id``, ``image_source`` (record id), ``image``, ``question``, ``answer``
    (``"yes"``/``"no"``), ``category`` (``random``/``popular``/``adversarial``), ``object``.
    ``records`` are dicts from `generate_records` or rows of a dataset from `make_synthetic_dataset`.
    """
    from datasets import Dataset, Features, Image, Value

    rows = []
    for record in records:
        for number, item in enumerate(record["pope"]):
            rows.append(
                {
                    "question_id": f"{record['id']}-{number}",
                    "image_source": record["id"],
                    "image": record["image"],
                    **item,
                }
            )
    features = Features(
        {
            "question_id": Value("string"),
            "image_source": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
            "object": Value("string"),
        }
    )
    return Dataset.from_list(rows, features=features)


def write_llava_json(
    records: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    split: str = "train",
    image_folder: str = "images",
) -> Path:
    """Write records as a LLaVA-layout JSON list plus PNG files; returns the JSON path.

    Layout::

        output_dir/{split}.json            [{"id", "image": "images/{split}/{id}.png", "conversations",
                                             "caption", "captions", "attributes", "boxes", "pope"}, ...]
        output_dir/images/{split}/{id}.png

    Image paths are relative to ``output_dir`` (LLaVA's ``image_folder``). ``records`` are dicts
    from `generate_records` or rows of a dataset from `make_synthetic_dataset`. Reads back with
    ``datasets.load_dataset("json", data_files=path, split="train")``.
    """
    output_dir = Path(output_dir)
    image_dir = output_dir / image_folder / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for record in records:
        relative = f"{image_folder}/{split}/{record['id']}.png"
        # PIL's PNG encoder is deterministic, so the same records give the same files.
        record["image"].save(output_dir / relative, format="PNG")
        # LLaVA's keys first, then the extra ground truth.
        entry = {"id": record["id"], "image": relative, "conversations": record["conversations"]}
        entry.update((k, v) for k, v in record.items() if k not in entry)
        entries.append(entry)
    json_path = output_dir / f"{split}.json"
    json_path.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    return json_path


def write_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 256,
    num_test: int = 64,
    seed: int = 0,
    config: SyntheticShapesConfig | None = None,
    **config_overrides: Any,
) -> dict[str, Path]:
    """Generate both splits and write them with `write_llava_json`; returns ``{split: json path}``."""
    config = _config(config, config_overrides)
    return {
        split: write_llava_json(generate_records(n, seed=seed, split=split, config=config), output_dir, split=split)
        for split, n in (("train", num_train), ("test", num_test))
    }
