"""Loading the configured cloud model: the BlazePose classifier or LLaVA-NeXT-Video, chosen by the checkpoint."""

from __future__ import annotations

from cloud_workers.model import CloudModel, LlavaVideoCloudModel
from core.checkpoints import loading
from core.settings import Settings


def load_cloud_model(settings: Settings) -> CloudModel:
    # The pose model's module is imported only for a pose checkpoint: a LLaVA worker never loads it.
    from cloud_workers.pose import PoseFallCloudModel, is_pose_checkpoint

    cloud = settings.cloud
    with loading("cloud", cloud.model):
        if is_pose_checkpoint(cloud.model):
            return PoseFallCloudModel.from_pretrained(cloud.model, revision=cloud.revision)
        return LlavaVideoCloudModel.from_pretrained(
            cloud.model,
            cloud.question,
            num_frames=cloud.num_frames,
            revision=cloud.revision,
            device=cloud.device,
            dtype=cloud.dtype,
            device_map=cloud.device_map,
        )
