//! S3 errors told apart: the service refused (and why, in words that say what to fix) or it
//! could not be asked.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use super::S3Destination;
use crate::destination::DestinationError;

impl S3Destination {
    /// Turns an SDK error into one that says whether the service refused or could not be
    /// asked, and what to fix.
    pub(super) fn classify<E>(
        &self,
        operation: &'static str,
        key: &str,
        err: SdkError<E>,
    ) -> DestinationError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let endpoint = self.endpoint.clone();
        let detail = error_chain(&err);
        let service = match &err {
            SdkError::ServiceError(service) => service,
            SdkError::DispatchFailure(failure)
                if failure.is_other() && detail.to_lowercase().contains("credentials") =>
            {
                return DestinationError::NoCredentials { detail };
            }
            SdkError::DispatchFailure(_)
            | SdkError::TimeoutError(_)
            | SdkError::ResponseError(_) => {
                return DestinationError::Unreachable { endpoint, detail };
            }
            _ => {
                return DestinationError::Refused {
                    endpoint,
                    operation,
                    key: key.to_owned(),
                    code: "Request".into(),
                    status: 0,
                    message: detail,
                }
            }
        };
        let status = service.raw().status().as_u16();
        let code = service.err().code().unwrap_or(match status {
            403 => "AccessDenied",
            404 => "NotFound",
            _ => "Unknown",
        });
        let bucket = self.bucket().to_owned();
        match code {
            "NoSuchBucket" => DestinationError::NoSuchBucket { bucket, endpoint },
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "TokenRefreshRequired" => DestinationError::BadCredentials {
                endpoint,
                code: code.to_owned(),
            },
            "AccessDenied" | "AllAccessDisabled" => DestinationError::AccessDenied {
                bucket,
                endpoint,
                operation,
            },
            _ => {
                let mut message = service.err().message().unwrap_or_default().to_owned();
                if status == 301
                    || code == "AuthorizationHeaderMalformed"
                    || code == "PermanentRedirect"
                {
                    message.push_str(" — the bucket is in another region; set --s3-region");
                }
                DestinationError::Refused {
                    endpoint,
                    operation,
                    key: key.to_owned(),
                    code: code.to_owned(),
                    status,
                    message,
                }
            }
        }
    }
}

/// `dispatch failure: io error: … Connection refused`: each cause once, without the Debug
/// dump that `DisplayErrorContext` adds.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}
