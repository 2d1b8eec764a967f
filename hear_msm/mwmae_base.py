"""HEAR API for mwmae_base, MW-MAE (multi-window masked autoencoder, Yadav et al.): `hear-validator hear_msm.mwmae_base`."""
from ._hear import get_scene_embeddings, get_timestamp_embeddings, load_hear_model

__all__ = ["load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


def load_model(model_file_path: str = "", **options):
    """See `hear_msm._hear.load_hear_model` for the weight sources and options."""
    return load_hear_model("mwmae_base", model_file_path, **options)
