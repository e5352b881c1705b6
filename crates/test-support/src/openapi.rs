//! Checks that a response matches what the OpenAPI document says of it.
//!
//! A small validator for the JSON Schema that utoipa writes (OpenAPI 3.1):
//! `$ref`, `type` (one or a list), `properties`, `required`,
//! `additionalProperties`, `items`, `allOf`, `oneOf`, `anyOf`, `enum`,
//! `minimum`/`maximum`, and `format: date-time`. Anything else in a schema
//! is ignored, so a check here can pass a response a full validator would
//! refuse, never the other way round.

use serde_json::Value;

/// The operation `method path` of the document, where `path` is the
/// document's template (`/v1/alerts/{alert_id}`).
pub fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    doc["paths"]
        .get(path)
        .and_then(|p| p.get(method.to_ascii_lowercase()))
}

/// Every `(METHOD, path template)` the document lists.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in ["get", "put", "post", "delete", "patch"] {
                if item.get(method).is_some() {
                    out.push((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
    }
    out.sort();
    out
}

/// `Ok` when the operation documents `status` and `body` matches the
/// schema documented for it (any JSON content type; other content is
/// not checked).
pub fn check_response(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let op =
        operation(doc, method, path).ok_or_else(|| format!("{method} {path} is not documented"))?;
    let resp = op["responses"]
        .get(status.to_string())
        .ok_or_else(|| format!("{method} {path} does not document status {status}"))?;
    let Some(content) = resp["content"].as_object() else {
        return Ok(()); // documented without a body
    };
    let Some(schema) = content
        .iter()
        .find(|(ct, _)| ct.contains("json"))
        .map(|(_, c)| &c["schema"])
    else {
        return Ok(()); // text (metrics, health) or an event stream
    };
    check(doc, schema, body, "$").map_err(|e| format!("{method} {path} {status}: {e}"))
}

/// `Ok` when `v` matches `schema`; `Err` says where and why not.
pub fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unsupported $ref {r}"))?;
        let target = doc["components"]["schemas"]
            .get(name)
            .ok_or_else(|| format!("{at}: $ref {r} does not resolve"))?;
        return check(doc, target, v, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(doc, s, v, at)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema[key].as_array() {
            let fits = any.iter().filter(|s| check(doc, s, v, at).is_ok()).count();
            if fits == 0 || (key == "oneOf" && fits > 1) {
                return Err(format!("{at}: {fits} of the {key} schemas fit {v}"));
            }
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {allowed:?}"));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| is_type(v, t)) {
        return Err(format!("{at}: {v} is not of type {types:?}"));
    }
    if let Some(n) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            return Err(format!("{at}: {n} is below the minimum"));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            return Err(format!("{at}: {n} is above the maximum"));
        }
    }
    if schema["format"] == "date-time"
        && let Some(s) = v.as_str()
        && chrono_like_rfc3339(s).is_err()
    {
        return Err(format!("{at}: {s:?} is not an RFC 3339 date-time"));
    }
    if let Value::Object(fields) = v {
        let props = schema["properties"].as_object();
        for req in schema["required"].as_array().into_iter().flatten() {
            let name = req.as_str().unwrap_or_default();
            if !fields.contains_key(name) {
                return Err(format!("{at}: required field {name} is missing"));
            }
        }
        for (name, value) in fields {
            let here = format!("{at}.{name}");
            match props.and_then(|p| p.get(name)) {
                Some(s) => check(doc, s, value, &here)?,
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => return Err(format!("{here}: not in the schema")),
                    Value::Object(_) => check(doc, &schema["additionalProperties"], value, &here)?,
                    // Open objects; a schema made of allOf parts checks
                    // each field in the part that names it.
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (v, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(doc, item_schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => true,
    }
}

/// RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn chrono_like_rfc3339(s: &str) -> Result<(), ()> {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (s.ends_with('Z') || s.ends_with('z') || s[s.len() - 6..].starts_with(['+', '-']));
    if ok { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_validator_refuses_what_does_not_fit() {
        let doc = json!({"components": {"schemas": {
            "A": {"type": "object", "required": ["id"], "additionalProperties": false,
                  "properties": {"id": {"type": "string"}, "n": {"type": ["integer", "null"], "minimum": 0},
                                 "at": {"type": "string", "format": "date-time"},
                                 "tags": {"type": "array", "items": {"enum": ["x", "y"]}}}}}}});
        let a = json!({"$ref": "#/components/schemas/A"});
        assert!(
            check(
                &doc,
                &a,
                &json!({"id": "1", "n": null, "at": "2026-11-30T01:02:03.5Z", "tags": ["x"]}),
                "$"
            )
            .is_ok()
        );
        for bad in [
            json!({"n": 1}),
            json!({"id": 1}),
            json!({"id": "1", "n": -1}),
            json!({"id": "1", "n": 1.5}),
            json!({"id": "1", "at": "yesterday"}),
            json!({"id": "1", "tags": ["z"]}),
            json!({"id": "1", "extra": true}),
            json!([]),
        ] {
            assert!(check(&doc, &a, &bad, "$").is_err(), "{bad} should not fit");
        }
    }
}
