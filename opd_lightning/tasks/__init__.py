"""Tasks shipped with opd-lightning, so that a run can train and be scored with no download.

`arithmetic` is the embedded gold task (character tokenizer, problem generator, jsonl splits under `data/`);
`sequences` (continue an arithmetic sequence, after worked examples) is one small pretrained models can do;
`long_addition` (column addition written out, completions of tens of tokens) is one with long completions.
`lm_eval/` holds lm-eval task templates for the same data; `opd_lightning.evaluation.materialise_tasks` renders
them with absolute data paths. Importing this package is cheap: transformers is imported only when a tokenizer
is built.
"""

from opd_lightning.tasks.arithmetic import char_tokenizer, load_problems, make_problems, task_data_path

__all__ = ["char_tokenizer", "load_problems", "make_problems", "task_data_path"]
