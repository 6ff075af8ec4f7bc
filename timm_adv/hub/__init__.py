"""Robust weights on the Hugging Face Hub: export, model cards, offline caches, publishing, pipeline, and the
import of published robust models (RobustBench, EasyRobust) as plain timm models."""
from .cache import populate_hf_cache
from .export import (METADATA_KEY, ExportError, ExportedModel, compare_outputs, export_checkpoint, export_from_task,
                     label_names_for, sample_batch, task_from_checkpoint)
from .model_card import method_reference, render_model_card, write_model_card
from .pipeline import load_hub_config, run_pipeline
from .publish import check_hub_folder, publish_folder
from .zoo import REFUSED, ZOO, EvalTransform, ZooEntry, get_zoo_entry, zoo_listing
from .zoo_import import import_zoo_model
