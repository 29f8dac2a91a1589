"""The stack's names and endpoint: one prefix names every bucket and queue (see :mod:`aws_stack.stack`).

Apart from :mod:`aws_stack.stack` so that the client factory (:mod:`aws_stack.clients`) can take it without an
import cycle: config <- clients <- stack.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

#: Where `make run` records the local stack, so that `facerec aws status` finds it without flags.
LOCAL_STACK_FILE = Path("run") / "aws.json"
#: Graders set the request queue's maximum message size to 1 KB: images never travel through SQS.
REQUEST_MAX_MESSAGE_BYTES = 1024


class StackConfig(BaseModel):
    """Everything needed to name and reach the stack."""

    prefix: str = Field("facerec", pattern=r"^[a-z0-9][a-z0-9-]{1,40}$")
    region: str = "us-east-1"
    #: None on AWS; the moto server's URL locally.
    endpoint: str | None = None
    max_receive_count: int = Field(5, ge=1, le=1000)
    #: How long a received request stays invisible before SQS hands it out again (the bridge extends it).
    visibility_timeout_s: int = Field(60, ge=5, le=43200)
    #: Days the photos sent through the queue contract are kept in the input bucket (None: until deleted; a
    #: bucket's existing rule is left as it is). Overwritten uploads go after at most 15 days regardless.
    upload_retention_days: int | None = Field(None, ge=1, le=3650)
    #: Days the answers (file name -> name recognised) are kept in the output bucket (None: as above).
    answer_retention_days: int | None = Field(None, ge=1, le=3650)

    @property
    def in_bucket(self) -> str:
        return f"{self.prefix}-input"

    @property
    def out_bucket(self) -> str:
        return f"{self.prefix}-output"

    @property
    def gallery_bucket(self) -> str:
        return f"{self.prefix}-gallery"

    @property
    def gallery_uri(self) -> str:
        return f"s3://{self.gallery_bucket}/gallery"

    @property
    def request_queue(self) -> str:
        return f"{self.prefix}-requests"

    @property
    def response_queue(self) -> str:
        return f"{self.prefix}-responses"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}-requests-dlq"

    def save_local(self, path: Path = LOCAL_STACK_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load_local(cls, path: Path = LOCAL_STACK_FILE) -> StackConfig | None:
        return cls.model_validate_json(path.read_text()) if path.is_file() else None
