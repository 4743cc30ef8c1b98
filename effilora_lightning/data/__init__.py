"""The data side: two LightningDataModules on one toolkit, emitting batches of one contract.

    batch.py                the batch contract (key table), is_generation_batch, generation_prompt, pad
    records.py              the one JSON / JSON Lines reader (streamed; bad-record policy)
    split.py                the one seeded validation split
    sampling.py             training samplers (seeded shuffle, length grouping) and the one mid-epoch resume path
    token_cache.py          tokenize once, memory-map on every rank (the entry format, keys, atomic writes)
    node_build.py           a node's ranks split a cold build; load_or_build_for keys a DataModule's part
    tokenizer.py            local tokenizer loading, pad token choice
    commonsense.py          CommonsenseDataModule (LLM-Adapters layout)
      commonsense_prompts.py  the Alpaca prompt and answer extraction (templates.py: its old import path)
      commonsense_examples.py record checks, training sequence / eval prompt of a record, datasets, collation
    visual_instruction.py   VisualInstructionDataModule (LLaVA-1.5 layout)
      visual_build.py         setup of one split: records checked and tokenized into the cache
      visual_dataset.py       dataset (images loaded per item) and collator
      conversation.py         conversations -> ids and labels (chat_templates, conversation_checks,
                              conversation_render hold the templates, the checks and the rendering)
      images.py               image paths, checks and preprocessing
"""

from effilora_lightning.data.commonsense import CommonsenseDataModule
from effilora_lightning.data.visual_instruction import VisualInstructionDataModule

__all__ = ["CommonsenseDataModule", "VisualInstructionDataModule"]
