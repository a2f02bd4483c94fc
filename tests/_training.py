"""Shared helpers of the training test suites (test_trainer.py, test_families_training.py)."""

import json

import torch
from PIL import Image

from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments

# Different sizes: Qwen2-VL gives them different patch grids.
IMAGES = {
    "red": ((40, 30), (255, 0, 0)),
    "green": ((24, 48), (0, 200, 0)),
    "blue": ((32, 32), (0, 0, 255)),
    "yellow": ((32, 32), (255, 255, 0)),
    "white": ((32, 32), (255, 255, 255)),
    "black": ((36, 28), (0, 0, 0)),
    "purple": ((32, 32), (128, 0, 128)),
    "orange": ((32, 40), (255, 140, 0)),
}


def write_training_data(folder, names=tuple(IMAGES)):
    """LLaVA records describing one plain-coloured image each; returns (json path, image folder)."""
    images = folder / "images"
    images.mkdir()
    records = []
    for name in names:
        size, rgb = IMAGES[name]
        Image.new("RGB", size, rgb).save(images / f"{name}.png")
        records.append(
            {
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture."},
                    {"from": "gpt", "value": f"a {name} picture"},
                ],
            }
        )
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path, images


def make_trainer(model, data, tmp_path, loss=None, **overrides):
    from cafe.training import load_records

    path, folder = data
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    collator = CafeCollator(model.processor, model=model, image_folder=str(folder))
    return CafeTrainer(
        model=model,
        args=CafeTrainingArguments(**kwargs),
        train_dataset=load_records(str(path)),
        data_collator=collator,
        processing_class=model.processor,
        loss=loss,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def llm_token_positions(model, batch, share_prefix):
    """Token positions the language model runs in one CAFe forward (rows x length summed over its calls)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[:2].numel()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.cafe_forward(batch, share_prefix=share_prefix)
    finally:
        hook.remove()
    return sum(seen)
