//! Names on the wire. They use the domain word `rpm` so that any tool that
//! meets them reads them the same way.

/// Kafka topic carrying validated reading batches, keyed by patient id.
pub const READINGS: &str = "rpm.readings.v1";
/// Kafka topic carrying alert lifecycle events, keyed by patient id.
pub const ALERTS: &str = "rpm.alerts.v1";
/// Kafka topic carrying rejected input with its reason, keyed by device id.
pub const DEADLETTER: &str = "rpm.deadletter.v1";

/// The default root of device topics: `{root}/{device_id}/readings`.
pub const MQTT_DEVICE_ROOT: &str = "rpm/v1/devices";

/// The MQTT topic filter ingest subscribes to (inside a shared subscription):
/// `{root}/{device_id}/readings` and `{root}/{device_id}/readings/json`.
pub fn mqtt_readings_filter(root: &str) -> String {
    format!("{root}/+/readings/#")
}

/// The topic a device publishes its readings to.
pub fn mqtt_readings_topic(root: &str, device_id: &str) -> String {
    format!("{root}/{device_id}/readings")
}

/// The device id and payload-format hint encoded in a readings topic under
/// `root`, or `None` when the topic is not a readings topic.
///
/// `rpm/v1/devices/bp-1/readings` gives `("bp-1", false)`,
/// `rpm/v1/devices/bp-1/readings/json` gives `("bp-1", true)`.
pub fn parse_readings_topic<'a>(root: &str, topic: &'a str) -> Option<(&'a str, bool)> {
    let rest = topic.strip_prefix(root)?.strip_prefix('/')?;
    let (device, tail) = rest.split_once('/')?;
    if device.is_empty() {
        return None;
    }
    match tail {
        "readings" => Some((device, false)),
        "readings/json" => Some((device, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_topics_parse() {
        let r = MQTT_DEVICE_ROOT;
        assert_eq!(
            parse_readings_topic(r, "rpm/v1/devices/bp-1/readings"),
            Some(("bp-1", false))
        );
        assert_eq!(
            parse_readings_topic(r, "rpm/v1/devices/bp-1/readings/json"),
            Some(("bp-1", true))
        );
        assert_eq!(
            parse_readings_topic(r, &mqtt_readings_topic(r, "ox-9")),
            Some(("ox-9", false))
        );
        assert_eq!(
            parse_readings_topic("t1/rpm", &mqtt_readings_topic("t1/rpm", "ox-9")),
            Some(("ox-9", false))
        );
        assert_eq!(parse_readings_topic(r, "rpm/v1/devices//readings"), None);
        assert_eq!(parse_readings_topic(r, "rpm/v1/devices/bp-1/status"), None);
        assert_eq!(
            parse_readings_topic(r, "rpm/v1/devices/bp-1/readings/xml"),
            None
        );
        assert_eq!(
            parse_readings_topic(r, "rpm/v1/devicesX/bp-1/readings"),
            None
        );
        assert_eq!(parse_readings_topic(r, "other/bp-1/readings"), None);
        assert_eq!(mqtt_readings_filter(r), "rpm/v1/devices/+/readings/#");
    }
}
