//! The daemons' OpenAPI documents: each daemon derives its document from its handlers
//! (`utoipa`) and checks in the result beside its `Cargo.toml` (`openapi.yaml`); a unit test
//! per daemon ([`openapi_drift_test!`]) calls [`check`], which fails when the code and the file
//! differ.
//! `UPDATE_OPENAPI=1 cargo test openapi` writes the files anew. [`PrometheusText`] is the
//! `GET /metrics` answer that every daemon's document shares.

use std::path::Path;

/// Declares a daemon's error answers for its handlers' `responses(...)`: each a type that
/// documents one status, with its description and the daemon's error body, so that a handler
/// names the answer instead of repeating the three.
///
/// ```ignore
/// vmhop_common::error_answers! {
///     ErrorBody;
///     /// The answer to a request about a volume that does not exist.
///     NoSuchVolume = 404, "No such volume";
/// }
/// ```
#[macro_export]
macro_rules! error_answers {
    ($body:ident; $($(#[$doc:meta])* $name:ident = $status:tt, $description:tt;)+) => {
        $(
            $(#[$doc])*
            #[derive(utoipa::IntoResponses)]
            #[response(status = $status, description = $description)]
            pub struct $name(pub $body);
        )+
    };
}

/// The answer of a daemon's `GET /metrics`, for its handler's `responses(...)`.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 200,
    description = "Prometheus text exposition format 0.0.4",
    content_type = "text/plain"
)]
pub struct PrometheusText(pub String);

/// Compares `T`'s document with the file at `path`; with `UPDATE_OPENAPI=1` writes the file
/// instead. Panics (it is meant for tests) with the command that updates the file.
pub fn check<T: utoipa::OpenApi>(path: &str) {
    let doc = T::openapi()
        .to_yaml()
        .unwrap_or_else(|e| panic!("the OpenAPI document does not serialise: {e}"));
    let path = Path::new(path);
    if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(path, &doc).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let file = std::fs::read_to_string(path).unwrap_or_default();
    if file != doc {
        let first = file
            .lines()
            .zip(doc.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(file.lines().count().min(doc.lines().count()));
        panic!(
            "{} differs from the API the code serves (first at line {}: file {:?}, code {:?}); \
             if the change is meant, run `UPDATE_OPENAPI=1 cargo test openapi` and commit the file",
            path.display(),
            first + 1,
            file.lines().nth(first).unwrap_or("<end>"),
            doc.lines().nth(first).unwrap_or("<end>"),
        );
    }
}

/// The unit test of a daemon's OpenAPI document: `openapi_drift_test!(ApiDoc)` where `ApiDoc`
/// (a path from the calling module) derives `utoipa::OpenApi` and the document is checked in as
/// `openapi.yaml` beside the crate's `Cargo.toml`.
#[macro_export]
macro_rules! openapi_drift_test {
    ($doc:path) => {
        #[cfg(test)]
        mod openapi_drift {
            #[test]
            fn the_checked_in_openapi_document_is_the_code() {
                $crate::openapi::check::<$doc>(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/openapi.yaml"
                ));
            }
        }
    };
}
