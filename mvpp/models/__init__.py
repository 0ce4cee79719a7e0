"""The MVPP models, built only on mvpp_kernels' public ops (any backend)."""
from ._ops import OpUnavailableError, has_op
from .baselines import MMRABaseline, NoRetrievalMLP, fit_gbt, gbt_features
from .common import ModelConfig, PopularityModel
from .memory import TopologyMemoryBank
from .mhp import MHPEncoder
from .mvpp_model import MVPPModel
from .temporal import TemporalEnlargement, UniformFramePooling

MODEL_CLASSES = {"MVPPModel": MVPPModel, "MMRABaseline": MMRABaseline, "NoRetrievalMLP": NoRetrievalMLP}


def build_model(name: str, data, config: ModelConfig | None = None):
    """Instantiate a model by class name for a dataset's feature sizes."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_CLASSES)}")
    kw = dict(frame_dim=data.frames.shape[-1], text_dim=data.text.shape[-1], retrieval_dim=data.retrieval.shape[-1])
    if name == "MVPPModel":
        kw["n_marks"] = data.n_marks
    return MODEL_CLASSES[name](**kw, config=config)


__all__ = ["MHPEncoder", "MMRABaseline", "MODEL_CLASSES", "MVPPModel", "ModelConfig", "NoRetrievalMLP",
           "OpUnavailableError", "PopularityModel", "TemporalEnlargement", "TopologyMemoryBank",
           "UniformFramePooling", "build_model", "fit_gbt", "gbt_features", "has_op"]
