//! Tracing: the process's subscriber (logs on stderr, text or JSON; spans exported over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and W3C trace context (`traceparent`) to carry a
//! render's trace between processes: in gRPC metadata on calls, and in the tasks the
//! coordinator hands out.
//!
//! Spans always get OpenTelemetry ids (a sampler that keeps everything), so a render has a trace
//! id to record even when nothing is exported.

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
    }
}

/// Installs the subscriber: `LONGTAKE_LOG` filters (default `info`), `LONGTAKE_LOG_FORMAT=json`
/// writes one JSON object per line, and with `OTEL_EXPORTER_OTLP_ENDPOINT` (gRPC, e.g.
/// `http://collector:4317`) spans go to that OTLP endpoint as service `service`
/// (`OTEL_SERVICE_NAME` overrides it). Call inside a Tokio runtime.
pub fn init(service: &str) -> Guard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LONGTAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("LONGTAKE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut problem = None;
    if let Some(endpoint) = &endpoint {
        use opentelemetry_otlp::WithExportConfig;
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => problem = Some(format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}")),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer("longtake");
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    if installed.is_err() {
        return Guard { provider: None };
    }
    if let Some(p) = problem {
        tracing::error!("{p}; spans are not exported");
    } else if let Some(e) = endpoint {
        tracing::info!(endpoint = %e, "exporting spans over OTLP");
    }
    Guard {
        provider: Some(provider),
    }
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`); `None` when the span
/// has no OpenTelemetry context (no subscriber installed, or the span is disabled).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The trace id in a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}

fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the remote span `traceparent` names (a malformed one is ignored:
/// the span starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = parse(traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// Makes `span` a child of the caller's span when the request's metadata carries a
/// `traceparent`.
pub fn set_parent_from(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if let Some(tp) = metadata.get("traceparent").and_then(|v| v.to_str().ok()) {
        set_parent(span, tp);
    }
}

/// Adds the current span's `traceparent` to outgoing call metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(tp) = traceparent(&tracing::Span::current())
        && let Ok(v) = tp.parse()
    {
        metadata.insert("traceparent", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = parse(tp).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled());
        assert_eq!(trace_id(tp), Some("0af7651916cd43dd8448eb211c80319c"));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
            "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
