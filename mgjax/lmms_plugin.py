"""mgjax's registration with lmms-eval (setup.cfg's `lmms_eval.models` entry point).

lmms-eval reads this while its own model registry is still being set up, so it holds the
manifest alone: the model classes (mgjax.lmms_model, which import jax and the model) load
only when a run asks for `--model mgjax`.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="mgjax",
    chat_class_path="mgjax.lmms_model.MgjaxChat",
    simple_class_path="mgjax.lmms_model.MgjaxSimple",
)
