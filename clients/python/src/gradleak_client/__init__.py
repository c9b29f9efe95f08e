"""gradleak-client: the Python SDK of gradleak, the federated-learning leakage audit service.

    from gradleak_client import Client
    job = Client().audit(model="lenet.safetensors", update="grad.safetensors",
                         ground_truth="batch.safetensors", arch="lenet", image_shape=(3, 32, 32))
    print(job.scores.worst_case["psnr"])

Importing it imports neither torch nor numpy: it depends on httpx and pydantic only. The helpers
that turn torch or numpy tensors into uploads are in `gradleak_client.tensors` (extra `tensors`),
the Flower integration in `gradleak_client.flower`, the CI gate in `gradleak_client.audit`.
"""

from gradleak_client._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, DEFAULT_URL
from gradleak_client._client import AsyncClient, Client
from gradleak_client._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    ConflictError,
    GradleakError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    UnauthorizedError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from gradleak_client._version import __version__
from gradleak_client.types import (
    Artifact,
    Catalog,
    Estimate,
    Federation,
    GeneratorManifest,
    GeneratorTraining,
    GeneratorUpload,
    GroundTruthUpload,
    Job,
    JobEvent,
    JobList,
    Metrics,
    ModelUpload,
    Study,
    StudyPoint,
    StudyPoints,
    UpdateUpload,
)

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Artifact",
    "AsyncClient",
    "BadRequestError",
    "Catalog",
    "Client",
    "ConflictError",
    "Estimate",
    "Federation",
    "GeneratorManifest",
    "GeneratorTraining",
    "GeneratorUpload",
    "GradleakError",
    "GroundTruthUpload",
    "Job",
    "JobEvent",
    "JobFailedError",
    "JobList",
    "Metrics",
    "ModelUpload",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServerError",
    "Study",
    "StudyPoint",
    "StudyPoints",
    "UnauthorizedError",
    "UnprocessableEntityError",
    "UpdateUpload",
    "WaitTimeoutError",
    "__version__",
]
