"""The backbone registry as plain names (no torch import, so ``pipeline.config`` can read it without
paying for torch in every Ray Data decode process).  ``cacr.model`` builds them."""

RESNET_ARCHS = ("narrow_resnet", "resnet18", "resnet34", "resnet50")
VIT_ARCHS = ("vit_small", "vit_base")
#: every backbone ``model.arch`` may name (pipeline/config.py's ModelConfig choices)
ARCHS = RESNET_ARCHS + VIT_ARCHS
#: ``model.norm`` choices (ResNets and the symmetric method's head)
NORMS = ("batch", "group", "none")
#: ``model.head`` choices: the symmetric method's MLP, or the momentum setup's projector + predictor
HEADS = ("mlp", "moco")
