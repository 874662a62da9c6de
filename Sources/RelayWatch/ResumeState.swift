// The resume state machine: what to subscribe with after a reconnect, which events are new, and
// when the watch is over. Pure, so every reconnect case is a unit test.

import Foundation

/// Where one exact topic was left: its epoch and the newest seq shown.
public struct TopicCursor: Sendable, Equatable {
    public var epoch: String?
    public var seq: UInt64
}

/// What to do with a frame.
public enum Verdict: Sendable, Equatable {
    /// A new event: show it.
    case show
    /// An event already shown before a reconnect (a replay overlap, a pattern's snapshot): drop it.
    case duplicate
    /// A control frame; nothing to show as an event.
    case control
}

public struct ResumeTracker: Sendable {
    /// The topics and patterns as given, in order.
    public let requested: [String]
    public private(set) var cursors: [String: TopicCursor] = [:]
    /// Topics seen only through a pattern: their newest seq shown. Patterns have no resume
    /// (docs/protocol.md), so their snapshot after a reconnect is deduplicated by seq alone.
    public private(set) var patternSeqs: [String: UInt64] = [:]
    /// Pattern topics not yet heard from on the current connection.
    private var unconfirmed: Set<String> = []
    public private(set) var connections = 0

    public init(topics: [String]) {
        requested = topics
        for topic in topics where !Self.isPattern(topic) {
            cursors[topic] = TopicCursor(epoch: nil, seq: 0)
        }
    }

    public static func isPattern(_ topic: String) -> Bool { topic.hasSuffix("*") }

    public var exactTopics: [String] { requested.filter { !Self.isPattern($0) } }
    public var patterns: [String] { requested.filter(Self.isPattern) }

    /// The subscribe ops for a new connection: a topic seen before resumes with its epoch and seq.
    public mutating func connectionOpened() -> [String] {
        connections += 1
        unconfirmed = Set(patternSeqs.keys)
        var seen = Set<String>()
        return requested.compactMap { topic in
            guard seen.insert(topic).inserted else { return nil }
            var members = ["\"op\":\"subscribe\"", "\"topic\":" + jsonString(topic)]
            if let cursor = cursors[topic], let epoch = cursor.epoch {
                members.append("\"epoch\":" + jsonString(epoch))
                members.append("\"since\":\(cursor.seq)")
            }
            return "{" + members.joined(separator: ",") + "}"
        }
    }

    public mutating func receive(_ frame: RelayFrame) -> Verdict {
        switch frame {
        case .subscribed(let topic, let epoch, _, let recovered):
            guard var cursor = cursors[topic] else { return .control }
            // Another epoch is another numbering: whatever comes next is new, even a low seq.
            if !recovered, epoch != cursor.epoch { cursor.seq = 0 }
            cursor.epoch = epoch
            cursors[topic] = cursor
            return .control
        case .event(let event):
            if var cursor = cursors[event.topic] {
                guard event.seq > cursor.seq else { return .duplicate }
                cursor.seq = event.seq
                cursors[event.topic] = cursor
                return .show
            }
            let known = patternSeqs[event.topic]
            if unconfirmed.remove(event.topic) != nil, let known, event.seq != known {
                // First word of this topic on a new connection, and not the one we showed last: the
                // relay numbers it anew (it restarted without state), or it moved on meanwhile.
                patternSeqs[event.topic] = event.seq
                return .show
            }
            if let known, event.seq <= known { return .duplicate }
            patternSeqs[event.topic] = event.seq
            return .show
        case .unsubscribed, .error, .other:
            return .control
        }
    }
}

/// When the watch is over, and with which exit status.
public struct WatchOutcome: Sendable, Equatable {
    public let exactTopics: Set<String>
    /// Ended topics: true for a successful `complete`.
    public private(set) var ended: [String: Bool] = [:]

    public init(exactTopics: [String]) { self.exactTopics = Set(exactTopics) }

    public mutating func record(_ event: WatchEvent) {
        guard exactTopics.contains(event.topic) else { return }
        switch event.type {
        case "complete": ended[event.topic] = event.success != false
        case "error": ended[event.topic] = false
        // An event after the end (a task retried on the same topic) reopens it.
        default: ended[event.topic] = nil
        }
    }

    /// 0 when every exact topic completed, 1 when all ended and one failed; nil while any runs,
    /// and always nil with patterns only (they never end).
    public var exitStatus: Int32? {
        guard !exactTopics.isEmpty, ended.count == exactTopics.count else { return nil }
        return ended.values.allSatisfy { $0 } ? 0 : 1
    }

    public var failedTopics: [String] { ended.filter { !$0.value }.map(\.key).sorted() }
}

/// Reconnect delays: doubling from `initial` to `maximum`, each drawn from its upper half, so that
/// many watchers cut off together do not come back together.
public struct Backoff: Sendable {
    public var initial: Double = 0.25
    public var maximum: Double = 5
    public private(set) var attempt = 0

    public init(initial: Double = 0.25, maximum: Double = 5) {
        self.initial = initial
        self.maximum = maximum
    }

    /// `random` in 0..<1.
    public mutating func next(random: Double = Double.random(in: 0..<1)) -> Double {
        let ceiling = min(maximum, initial * pow(2, Double(min(attempt, 30))))
        attempt += 1
        return ceiling * (0.5 + 0.5 * random)
    }

    public mutating func reset() { attempt = 0 }
}

func jsonString(_ text: String) -> String {
    let data = (try? JSONSerialization.data(withJSONObject: [text], options: [.withoutEscapingSlashes])) ?? Data("[\"\"]".utf8)
    return String(String(decoding: data, as: UTF8.self).dropFirst().dropLast())
}
