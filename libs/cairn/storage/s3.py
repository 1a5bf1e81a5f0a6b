"""The s3:// backend: AWS S3 or any S3-compatible server (MinIO, Ceph RGW, moto), via boto3.

    s3://[ACCESS_KEY:SECRET@]bucket[/prefix][?endpoint=http://host:port&region=...]

Credentials come from the URL's user info, else the `access_key`/`secret_key` options,
else boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, ...). The
endpoint comes from `?endpoint=`, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; a custom
endpoint gets path-style addressing (bucket in the path), which every S3 clone supports.

boto3 is synchronous, so each request runs in a thread pool owned by the store. boto3's own
retries are turned off: every failure is mapped once to Cairn's error vocabulary here, and
temporary ones (5xx, throttling, dropped connections) are retried by cairn.retry with
backoff, jitter and a deadline. That keeps one retry policy for the whole client and makes
the number of attempts observable. Credentials never reach a message, a log line or repr.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from cairn.errors import (
    CairnError,
    ConfigError,
    InvalidArgument,
    NotFound,
    PermanentError,
    TemporaryError,
    UnavailableError,
)
from cairn.retry import Backoff, retry
from cairn.storage.base import ObjectInfo, ObjectStore, as_bool, as_number, url_options

log = logging.getLogger(__name__)
T = TypeVar("T")

_OPTIONS = {
    "endpoint",
    "region",
    "access_key",
    "secret_key",
    "session_token",
    "path_style",
    "create_bucket",
    "max_workers",
    "deadline",
    "check_deadline",
    "connect_timeout",
    "read_timeout",
}
# Error codes S3 and its clones use for "slow down / try again"; most also come as 5xx.
_TEMPORARY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}


@dataclass(frozen=True)
class _Credentials:
    access_key: str | None
    secret_key: str | None
    session_token: str | None

    def __repr__(self) -> str:  # so that no debug dump of the store shows them
        return "<credentials>"


class S3Store(ObjectStore):
    """Objects in one bucket, optionally under a key prefix."""

    scheme = "s3"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url)
        opts = url_options(url, options, _OPTIONS)
        userinfo, self.bucket, prefix = _split(url, self.url)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        access, _, secret = userinfo.partition(":")
        access = unquote(access) or opts.get("access_key")
        secret = unquote(secret) or opts.get("secret_key")
        if bool(access) != bool(secret):
            raise ConfigError(
                f"object store {self.url}: give both the access key and the "
                f"secret (s3://KEY:SECRET@bucket), or neither"
            )
        self._credentials = _Credentials(
            access or None, secret or None, opts.get("session_token") or None
        )
        self.endpoint = (
            opts.get("endpoint")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"object store {self.url}: endpoint {self.endpoint!r} must be "
                f"an http:// or https:// URL"
            )
        self.region = (
            opts.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.path_style = as_bool("path_style", opts.get("path_style", bool(self.endpoint)))
        self.create_bucket = as_bool("create_bucket", opts.get("create_bucket", False))
        self.deadline = as_number("deadline", opts.get("deadline", 60.0))
        self.check_deadline = as_number("check_deadline", opts.get("check_deadline", 10.0))
        self.connect_timeout = as_number("connect_timeout", opts.get("connect_timeout", 5.0))
        self.read_timeout = as_number("read_timeout", opts.get("read_timeout", 30.0))
        self.max_workers = as_number("max_workers", opts.get("max_workers", 16), int, 1)
        self.backoff = Backoff(initial=0.1, maximum=5.0)
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="cairn-s3")
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def where(self) -> str:
        """The store and the server it talks to, for messages."""
        server = self.endpoint or f"AWS {self.region}"
        return self.url if server in unquote(self.url) else f"{self.url} ({server})"

    # -- the contract ---------------------------------------------------------------

    async def _put(self, key: str, data: bytes) -> None:
        await self._request("put", key, self._put_sync, key, data)

    async def _get(self, key: str, offset: int, length: int) -> bytes:
        return await self._request("get", key, self._get_sync, key, offset, length)

    async def _delete(self, key: str) -> None:
        await self._request("delete", key, self._delete_sync, key)

    async def _head(self, key: str) -> ObjectInfo:
        return await self._request("head", key, self._head_sync, key)

    async def _list(
        self, prefix: str, start_after: str, page_size: int
    ) -> AsyncIterator[ObjectInfo]:
        # One request per page, each retried on its own, following the continuation
        # token (what boto3's paginator does, minus restarting a whole listing when
        # a page in the middle fails).
        token = None
        while True:
            page, token = await self._request(
                "list", prefix, self._list_sync, prefix, start_after, page_size, token
            )
            for info in page:
                yield info
            if token is None:
                return

    async def _check(self) -> None:
        try:
            try:
                await self._request(
                    "check", "", self._head_bucket_sync, deadline=self.check_deadline
                )
            except NotFound:
                if not self.create_bucket:
                    raise ConfigError(
                        f"bucket {self.bucket!r} does not exist at "
                        f"{self.where}: create it, or add "
                        f"?create_bucket=true to the URL"
                    ) from None
                await self._request(
                    "create bucket", "", self._create_bucket_sync, deadline=self.check_deadline
                )
        except TemporaryError as error:
            cause = error.__cause__ if isinstance(error.__cause__, CairnError) else error
            raise UnavailableError(
                f"{cause}; check the endpoint and that the server is running"
            ) from error

    async def close(self) -> None:
        def shut() -> None:
            self._pool.shutdown(wait=True)
            if self._client is not None:
                self._client.close()

        await asyncio.to_thread(shut)

    # -- blocking parts, run in the pool --------------------------------------------

    def _s3(self) -> Any:
        """The boto3 client, made on first use (loading boto3's models takes a while)."""
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                creds = self._credentials
                session = boto3.session.Session(
                    aws_access_key_id=creds.access_key,
                    aws_secret_access_key=creds.secret_key,
                    aws_session_token=creds.session_token,
                    region_name=self.region,
                )
                config = Config(
                    region_name=self.region,
                    signature_version="s3v4",
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    max_pool_connections=self.max_workers,
                    # One attempt in all (boto's "max_attempts" counts retries only):
                    # cairn.retry does the retrying, with the deadline of the request.
                    retries={"mode": "standard", "total_max_attempts": 1},
                    s3={"addressing_style": "path" if self.path_style else "auto"},
                    # Default checksum trailers are not understood by every S3 clone.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                self._client = session.client("s3", endpoint_url=self.endpoint, config=config)
            return self._client

    def _put_sync(self, key: str, data: bytes) -> None:
        self._s3().put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def _get_sync(self, key: str, offset: int, length: int) -> bytes:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + key}
        if length > 0:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset > 0:
            args["Range"] = f"bytes={offset}-"
        try:
            response = self._s3().get_object(**args)
        except Exception as error:
            if _code(error) == "InvalidRange" or _status(error) == 416:
                return b""  # the range starts at or after the end: the object exists
            raise
        with response["Body"] as body:
            return body.read()

    def _delete_sync(self, key: str) -> None:
        self._s3().delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def _head_sync(self, key: str) -> ObjectInfo:
        response = self._s3().head_object(Bucket=self.bucket, Key=self.prefix + key)
        return ObjectInfo(key, int(response["ContentLength"]), response["LastModified"].timestamp())

    def _list_sync(
        self, prefix: str, start_after: str, page_size: int, token: str | None
    ) -> tuple[list[ObjectInfo], str | None]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "MaxKeys": page_size,
        }
        if token:
            args["ContinuationToken"] = token
        elif start_after:
            args["StartAfter"] = self.prefix + start_after
        response = self._s3().list_objects_v2(**args)
        cut = len(self.prefix)
        page = [
            ObjectInfo(item["Key"][cut:], int(item["Size"]), item["LastModified"].timestamp())
            for item in response.get("Contents", ())
        ]
        more = response.get("IsTruncated") and response.get("NextContinuationToken")
        return page, more or None

    def _head_bucket_sync(self) -> None:
        self._s3().head_bucket(Bucket=self.bucket)

    def _create_bucket_sync(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # S3 rejects naming the default region
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._s3().create_bucket(**args)
        except Exception as error:
            if _code(error) != "BucketAlreadyOwnedByYou":  # a concurrent check() won
                raise
        log.info("created bucket %s at %s", self.bucket, self.where)

    # -- plumbing -------------------------------------------------------------------

    async def _request(
        self, action: str, key: str, fn: Callable[..., T], *args: Any, deadline: float | None = None
    ) -> T:
        """Runs one request in the pool, mapped to Cairn's errors and retried if temporary."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args)

        async def attempt() -> T:
            try:
                return await loop.run_in_executor(self._pool, call)
            except Exception as error:
                mapped = self._map_error(error, action, key)
                if mapped is error:
                    raise
                raise mapped from error

        def note(attempts: int, error: BaseException) -> None:
            log.info(
                "retrying %s %s on %s (attempt %d): %s",
                action,
                key or "-",
                self.url,
                attempts + 1,
                error,
            )

        return await retry(
            attempt,
            deadline=self.deadline if deadline is None else deadline,
            backoff=self.backoff,
            on_retry=note,
        )

    def _map_error(self, error: Exception, action: str, key: str) -> Exception:
        """Cairn's error for a boto error (anything else is returned unchanged)."""
        from botocore import exceptions as bx

        what = f"{action} {key}" if key else action
        if isinstance(error, CairnError):
            return error
        if isinstance(error, bx.ClientError):
            return self._map_client_error(error, what, key)
        if isinstance(
            error, bx.NoCredentialsError | bx.PartialCredentialsError | bx.CredentialRetrievalError
        ):
            return ConfigError(
                f"no usable credentials for {self.where}: put KEY:SECRET@ in "
                f"the URL or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(error, bx.SSLError):
            return ConfigError(
                f"TLS with {self.where} failed: {_one_line(error)}; check the "
                f"endpoint's scheme and certificate"
            )
        if isinstance(error, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
            return UnavailableError(f"cannot reach {self.where}: {_one_line(error)}")
        if isinstance(error, bx.ParamValidationError):
            return InvalidArgument(f"bad request to {self.where} for {what}: {_one_line(error)}")
        if isinstance(error, bx.BotoCoreError):
            return PermanentError(f"{what} on {self.where} failed: {_one_line(error)}")
        return error

    def _map_client_error(self, error: Exception, what: str, key: str) -> Exception:
        code, status = _code(error), _status(error)
        if code == "NoSuchBucket":
            return ConfigError(
                f"bucket {self.bucket!r} does not exist at {self.where}: "
                f"create it, or add ?create_bucket=true to the URL"
            )
        if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
            return NotFound(f"no object {key} in {self.url}" if key else f"{self.url}: not found")
        if status in (401, 403) or code in _AUTH_CODES:
            # The server's message is left out on purpose: some echo the access key.
            return ConfigError(
                f"{self.where} refused {what} ({code or status}): check the "
                f"access key and secret, and that they may use bucket "
                f"{self.bucket!r}"
            )
        if status >= 500 or status == 429 or code in _TEMPORARY_CODES:
            return TemporaryError(f"{self.where} answered {status} {code} to {what}")
        message = getattr(error, "response", {}).get("Error", {}).get("Message", "")
        return PermanentError(
            f"{self.where} answered {status} {code} to {what}: {_one_line(message)}"
        )


def _split(url: str, shown: str) -> tuple[str, str, str]:
    """(user info, bucket, prefix) of an s3:// URL; the last '@' ends the user info."""
    rest = url.partition("://")[2].partition("#")[0].partition("?")[0]
    userinfo, _, location = rest.rpartition("@")
    bucket, _, prefix = location.partition("/")
    if not bucket or ":" in bucket:
        raise ConfigError(
            f"bad object store URL {shown!r}: use s3://bucket[/prefix]"
            f"?endpoint=http://host:port (the server goes in ?endpoint=)"
        )
    return userinfo, bucket, prefix


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _status(error: Exception) -> int:
    meta = getattr(error, "response", {}).get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode") or 0)


def _one_line(error: object) -> str:
    return " ".join(str(error).split())
