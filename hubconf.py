"""torch.hub entry point: the trunk a method file trained, rebuilt from its backbone.pth.

    import torch
    model = torch.hub.load("/path/to/sslref", "backbone", checkpoint="runs/simclr/backbone.pth", source="local")
    features = model(images)  # (B, width): images normalised as the run's probes saw them (common.MEAN_STD)
"""
dependencies = ["torch", "torchvision"]

import torch

import common


def backbone(checkpoint, **kwargs):
    """backbone.pth -> the torchvision ResNet that wrote it, weights loaded, fc = Identity, in eval mode: model(x)
    gives the trunk's pooled features (CPC's: of one patch); or the ViT (common.ViT, torchvision's VisionTransformer
    without its head): model(x) gives the class token. The file records how to rebuild it (method, arch,
    image_size: the CIFAR stem at <= 64 px; for CPC also norm and stacks; for MoCo v3's ViT-S its 12 heads); keyword
    arguments override the record, and a file written without one needs arch= and image_size= (for CPC also
    method="cpc", norm= and stacks=).

    A new head goes where torchvision's was: model.fc = torch.nn.Linear(width, classes), width = model(x).shape[1]
    (512 for resnet18, 2048 for resnet50); call model.train() before fine-tuning."""
    state = torch.load(checkpoint, map_location="cpu")  # weights_only: tensors and plain values, nothing executed
    recipe = {**getattr(state, "_metadata", {}).get("", {}).get("sslref", {}), **kwargs}  # common.Run.save wrote it
    if "arch" not in recipe or "image_size" not in recipe:
        raise ValueError(f"{checkpoint} does not record its trunk; pass arch= and image_size= (the run's --arch and "
                         "--image-size) to torch.hub.load")
    if recipe.pop("method", None) == "cpc":  # pre-activation blocks cut after `stacks` stages, defined in cpc.py
        from cpc import build_trunk
        model, _ = build_trunk(**recipe)
    else:  # every other method file's trunk
        model, _ = common.build_backbone(**recipe, vit=True)
    model.load_state_dict(state)
    return model.eval()
