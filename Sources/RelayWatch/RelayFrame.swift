// What the relay sends a subscriber, decoded into the few fields `watch` needs.

import Foundation

/// One event as `watch` shows it. Decoded once, so the rest of the code never touches `Any`.
public struct WatchEvent: Sendable, Equatable {
    public var topic: String
    public var seq: UInt64
    public var type: String?
    public var percent: Double?
    public var message: String?
    /// `complete`'s `success`; nil when absent.
    public var success: Bool?

    public init(
        topic: String, seq: UInt64, type: String? = nil, percent: Double? = nil, message: String? = nil,
        success: Bool? = nil
    ) {
        self.topic = topic
        self.seq = seq
        self.type = type
        self.percent = percent
        self.message = message
        self.success = success
    }

    /// Emitters disagree on how they say "how far": `percent`, `current`/`total`, `progress`/`total`
    /// (a count), or `progress` alone (a percentage, as every emitter of this project sends it,
    /// next to `current`/`total`). The most explicit wins; the result is clamped to 0...100.
    static func percent(from object: [String: Any]) -> Double? {
        func number(_ key: String) -> Double? {
            guard let value = object[key], !isBoolean(value), let value = value as? NSNumber else { return nil }
            let double = value.doubleValue
            return double.isFinite ? double : nil
        }
        let result: Double?
        if let percent = number("percent") {
            result = percent
        } else if let current = number("current"), let total = number("total"), total > 0 {
            result = current / total * 100
        } else if let progress = number("progress"), let total = number("total"), total > 0 {
            result = progress / total * 100
        } else {
            result = number("progress")
        }
        return result.map { min(100, max(0, $0)) }
    }

    static func make(from object: [String: Any], topic: String, seq: UInt64) -> WatchEvent {
        let type = object["type"] as? String
        var message = object["message"] as? String
        if type == "error", let error = object["error"] as? String {
            message = error
        }
        var success: Bool?
        if let value = object["success"], isBoolean(value), let value = value as? NSNumber {
            success = value.boolValue
        }
        return WatchEvent(
            topic: topic, seq: seq, type: type, percent: percent(from: object), message: message, success: success)
    }
}

/// A text frame from the relay (docs/protocol.md, section 4).
public enum RelayFrame: Sendable, Equatable {
    case event(WatchEvent)
    case subscribed(topic: String, epoch: String?, seq: UInt64, recovered: Bool)
    case unsubscribed(topic: String, reason: String?)
    case error(code: String, message: String, topic: String?)
    /// Anything else with an `op` (pong, refreshed): nothing for `watch` to do.
    case other

    /// Nil when the text is not a JSON object (the relay never sends one; a proxy might).
    public static func decode(_ text: String) -> RelayFrame? {
        guard let data = text.data(using: .utf8),
            let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        else { return nil }
        func unsigned(_ key: String) -> UInt64? {
            guard let value = object[key], !isBoolean(value), let number = value as? NSNumber,
                number.doubleValue >= 0
            else { return nil }
            return number.uint64Value
        }
        if let op = object["op"] as? String {
            let topic = object["topic"] as? String
            switch op {
            case "subscribed":
                guard let topic else { return .other }
                return .subscribed(
                    topic: topic, epoch: object["epoch"] as? String, seq: unsigned("seq") ?? 0,
                    recovered: object["recovered"].map(isBoolean) == true && object["recovered"] as? Bool == true)
            case "unsubscribed":
                guard let topic else { return .other }
                return .unsubscribed(topic: topic, reason: object["reason"] as? String)
            case "error":
                return .error(
                    code: object["code"] as? String ?? "error", message: object["message"] as? String ?? "",
                    topic: topic)
            default:
                return .other
            }
        }
        guard let topic = object["topic"] as? String, let seq = unsigned("seq") else { return .other }
        return .event(WatchEvent.make(from: object, topic: topic, seq: seq))
    }
}

/// JSONSerialization gives `true` as an NSNumber that `as? Double` also accepts, and `1` as one that
/// `as? Bool` accepts; only the class tells them apart (`__NSCFBoolean` on Linux and Darwin).
func isBoolean(_ value: Any) -> Bool {
    String(describing: type(of: value)).contains("Boolean")
}
