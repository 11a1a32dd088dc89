//! AMQP basic properties ⇄ qmesh messages. `message-id` is the qmesh id (de-duplication),
//! `headers` are the qmesh headers, and the other properties travel as `amqp-*` headers so that
//! they come back to an AMQP consumer and are visible to gRPC and HTTP consumers too.
//!
//! ```text
//!   publish:  message-id ─▶ id   headers{k: v} ─▶ headers{k: "v"}   content-type ─▶ amqp-content-type …
//!   deliver:  id ─▶ message-id   headers ─▶ headers (amqp-* back to properties)   publish time ─▶ timestamp
//! ```

use amq_protocol::{
    protocol::BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use qmesh_proto::v1;

/// Headers that carry the AMQP properties other than `message-id` and `headers`.
const CONTENT_TYPE: &str = "amqp-content-type";
const CONTENT_ENCODING: &str = "amqp-content-encoding";
const CORRELATION_ID: &str = "amqp-correlation-id";
const REPLY_TO: &str = "amqp-reply-to";
const EXPIRATION: &str = "amqp-expiration";
const TIMESTAMP: &str = "amqp-timestamp";
const TYPE: &str = "amqp-type";
const USER_ID: &str = "amqp-user-id";
const APP_ID: &str = "amqp-app-id";
const PRIORITY: &str = "amqp-priority";

/// The qmesh message for an AMQP publish, or why it cannot be one (a header whose value is a
/// nested table or array, which qmesh's string headers cannot carry without loss).
pub fn to_message(properties: &BasicProperties, body: Vec<u8>) -> Result<v1::Message, String> {
    let mut message = v1::Message {
        id: properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        payload: body.into(),
        ..Default::default()
    };
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            if name.as_str() == DELAY_HEADER {
                continue;
            }
            let text = header_text(value)
                .ok_or_else(|| format!("header {:?}: {}", name.as_str(), unsupported(value)))?;
            message.headers.insert(name.as_str().to_owned(), text);
        }
    }
    let mut put = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            message.headers.insert(name.to_owned(), value);
        }
    };
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    put(CONTENT_TYPE, text(properties.content_type()));
    put(CONTENT_ENCODING, text(properties.content_encoding()));
    put(CORRELATION_ID, text(properties.correlation_id()));
    put(REPLY_TO, text(properties.reply_to()));
    put(EXPIRATION, text(properties.expiration()));
    put(TYPE, text(properties.kind()));
    put(USER_ID, text(properties.user_id()));
    put(APP_ID, text(properties.app_id()));
    put(TIMESTAMP, properties.timestamp().map(|t| t.to_string()));
    put(PRIORITY, properties.priority().map(|p| p.to_string()));
    Ok(message)
}

/// The header of RabbitMQ's delayed-message plugin: a delay in milliseconds.
const DELAY_HEADER: &str = "x-delay";

/// The delay a publish asks for with `x-delay` (milliseconds, as RabbitMQ's delayed-message plugin
/// takes it), or why it is not one; the header itself is not kept.
pub fn delay(properties: &BasicProperties) -> Result<Option<std::time::Duration>, String> {
    let Some(value) = properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(DELAY_HEADER))
    else {
        return Ok(None);
    };
    let ms: i128 = match value {
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        AMQPValue::Timestamp(n) => i128::from(*n),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes())
            .trim()
            .parse()
            .map_err(|_| format!("header {DELAY_HEADER}: not a number of milliseconds"))?,
        AMQPValue::ShortString(s) => s
            .as_str()
            .trim()
            .parse()
            .map_err(|_| format!("header {DELAY_HEADER}: not a number of milliseconds"))?,
        _ => {
            return Err(format!(
                "header {DELAY_HEADER}: not a number of milliseconds"
            ));
        }
    };
    match u64::try_from(ms) {
        Ok(0) => Ok(None),
        Ok(ms) => Ok(Some(std::time::Duration::from_millis(ms))),
        // The plugin delivers a negative delay at once; a client asking for one made a mistake.
        Err(_) => Err(format!("header {DELAY_HEADER}: {ms} ms is negative")),
    }
}

/// A header value as qmesh's string form; `None` for nested tables and arrays.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            let scale = u32::from(d.scale);
            match 10u64.checked_pow(scale) {
                Some(div) if scale > 0 => {
                    let v = u64::from(d.value);
                    format!("{}.{:0width$}", v / div, v % div, width = scale as usize)
                }
                _ => d.value.to_string(),
            }
        }
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => return None,
    })
}

fn unsupported(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::FieldArray(_) => {
            "arrays are not supported in headers (qmesh headers are strings)"
        }
        _ => "nested tables are not supported in headers (qmesh headers are strings)",
    }
}

/// The properties of a delivery: the `amqp-*` headers back to properties, the others as `headers`
/// (long strings), the id as `message-id`, the publish time as `timestamp` unless the publisher set
/// one, and `delivery-mode` 2 (every qmesh message is persistent). A value too long for a short
/// string property stays a header.
pub fn properties(message: &v1::Message) -> BasicProperties {
    type Set = fn(BasicProperties, ShortString) -> BasicProperties;
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    let mut headers = FieldTable::default();
    let short = |v: &str| ShortString::try_new(v.to_owned()).ok();
    for (name, value) in &message.headers {
        let set: Option<Set> = match name.as_str() {
            CONTENT_TYPE => Some(BasicProperties::with_content_type),
            CONTENT_ENCODING => Some(BasicProperties::with_content_encoding),
            CORRELATION_ID => Some(BasicProperties::with_correlation_id),
            REPLY_TO => Some(BasicProperties::with_reply_to),
            EXPIRATION => Some(BasicProperties::with_expiration),
            TYPE => Some(BasicProperties::with_type),
            USER_ID => Some(BasicProperties::with_user_id),
            APP_ID => Some(BasicProperties::with_app_id),
            _ => None,
        };
        if let (Some(set), Some(v)) = (set, short(value)) {
            properties = set(properties, v);
            continue;
        }
        match (name.as_str(), value.parse::<u64>()) {
            (TIMESTAMP, Ok(t)) => properties = properties.with_timestamp(t),
            (PRIORITY, Ok(p)) if p <= 255 => properties = properties.with_priority(p as u8),
            _ => {
                if let Some(key) = short(name) {
                    headers.insert(
                        key,
                        AMQPValue::LongString(LongString::from(value.as_bytes())),
                    );
                }
            }
        }
    }
    if !message.id.is_empty()
        && let Some(id) = short(&message.id)
    {
        properties = properties.with_message_id(id);
    }
    if properties.timestamp().is_none()
        && let Some(t) = &message.publish_time
        && let Ok(seconds) = u64::try_from(t.seconds)
    {
        properties = properties.with_timestamp(seconds);
    }
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_survive_a_round_trip_through_a_qmesh_message() {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        headers.insert("retries".into(), AMQPValue::LongInt(3));
        headers.insert("urgent".into(), AMQPValue::Boolean(true));
        let sent = BasicProperties::default()
            .with_message_id("order-1".into())
            .with_content_type("application/json".into())
            .with_correlation_id("c-7".into())
            .with_timestamp(1_700_000_000)
            .with_delivery_mode(1)
            .with_headers(headers);
        let message = to_message(&sent, b"{}".to_vec()).unwrap();
        assert_eq!(message.id, "order-1");
        assert_eq!(message.headers["tenant"], "acme");
        assert_eq!(message.headers["retries"], "3");
        assert_eq!(message.headers["urgent"], "true");
        assert_eq!(message.headers[CONTENT_TYPE], "application/json");

        let back = properties(&message);
        assert_eq!(back.message_id().as_ref().unwrap().as_str(), "order-1");
        assert_eq!(
            back.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(back.correlation_id().as_ref().unwrap().as_str(), "c-7");
        assert_eq!(*back.timestamp(), Some(1_700_000_000));
        assert_eq!(
            *back.delivery_mode(),
            Some(2),
            "every qmesh message is persistent"
        );
        let headers = back.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert!(!headers.inner().contains_key(CONTENT_TYPE));
    }

    #[test]
    fn a_nested_header_is_refused_by_name_and_long_values_stay_headers() {
        let mut inner = FieldTable::default();
        inner.insert("a".into(), AMQPValue::LongInt(1));
        let mut headers = FieldTable::default();
        headers.insert("nested".into(), AMQPValue::FieldTable(inner));
        let error =
            to_message(&BasicProperties::default().with_headers(headers), vec![]).unwrap_err();
        assert!(error.contains("\"nested\""), "{error}");

        let mut message = v1::Message::default();
        message.headers.insert(CONTENT_TYPE.into(), "x".repeat(300));
        message.headers.insert("k".repeat(300), "dropped".into());
        let props = properties(&message);
        assert!(props.content_type().is_none());
        let headers = props.headers().as_ref().unwrap();
        assert!(headers.inner().contains_key(CONTENT_TYPE));
        assert_eq!(headers.inner().len(), 1);
    }
}
