"""Keep transformers' checkpoint key renaming for CAFe classes.

transformers 5 stores some VLMs in their published key layout (e.g. ``language_model.lm_head``)
and renames keys on load through a table looked up by class name, then ``model_type`` — but it
skips that table for classes defined outside transformers (custom code), which would leave the LM
head freshly initialised. Registering the stock table under the CAFe class name restores it.
"""

from __future__ import annotations

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping


def inherit_checkpoint_conversion(cafe_class: type, stock_class: type, model_type: str) -> None:
    mapping = get_checkpoint_conversion_mapping(stock_class.__name__) or get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(cafe_class.__name__, mapping, overwrite=True)
