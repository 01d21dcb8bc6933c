//! The console (`console/`, a Preact app built once with Vite): its built files are embedded
//! in the binary and served at `/` and `/console/`, so the binary needs neither node nor the
//! network at run time. The files are static and hold no data; everything the console shows
//! comes from the API with the key its user logs in with.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::RustEmbed)]
#[folder = "../console/dist"]
struct Assets;

fn asset(path: &str) -> Response {
    match Assets::get(path) {
        Some(file) => {
            let cache = if path.starts_with("assets/") {
                // Vite names them by content hash: a new build gets new names.
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            (
                [
                    (header::CONTENT_TYPE, content_type(path)),
                    (header::CACHE_CONTROL, cache),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; frame-ancestors 'none'",
                    ),
                ],
                file.data,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such console file").into_response(),
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// `GET /` and `GET /console/`: the console's page.
pub async fn index() -> Response {
    asset("index.html")
}

/// `GET /console/assets/{file}`: its scripts and styles.
pub async fn file(Path(file): Path<String>) -> Response {
    asset(&format!("assets/{file}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_console_is_embedded_and_its_page_names_only_embedded_files() {
        let index = Assets::get("index.html").expect("console/dist/index.html: run scripts/build-console.sh");
        let html = String::from_utf8(index.data.to_vec()).unwrap();
        let referenced: Vec<&str> = html
            .split('"')
            .filter_map(|s| s.strip_prefix("/console/"))
            .collect();
        assert!(referenced.iter().any(|f| f.ends_with(".js")), "{html}");
        for file in referenced {
            assert!(
                Assets::get(file).is_some(),
                "index.html names {file}, which is not embedded"
            );
        }
    }
}
