// What `watch` prints: the bars of a terminal, plain lines for a pipe. Pure functions of the
// state and the clock, so the tests check exactly what a person would see.

import Foundation

/// One topic's bar.
public struct TopicView: Sendable, Equatable {
    public enum Phase: Sendable, Equatable { case waiting, running, complete, failed }

    public var topic: String
    public var phase: Phase = .waiting
    public var percent: Double?
    public var message = ""
    public var seq: UInt64 = 0
    /// Monotonic seconds of the newest event.
    public var lastEventAt: Double?
    /// Monotonic seconds of the events within the rate window.
    public var recent: [Double] = []

    public static let rateWindow = 10.0

    public init(topic: String) { self.topic = topic }

    public mutating func apply(_ event: WatchEvent, at now: Double) {
        seq = event.seq
        lastEventAt = now
        recent.append(now)
        recent.removeAll { now - $0 > Self.rateWindow }
        switch event.type {
        case "complete":
            phase = event.success == false ? .failed : .complete
            if event.success != false { percent = 100 }
        case "error":
            phase = .failed
        default:
            phase = .running
        }
        if let value = event.percent { percent = value }
        if let text = event.message { message = text } else if event.type == "complete" { message = "done" }
    }

    /// Events per second over the last `rateWindow` seconds (or since the first event, when sooner).
    public func rate(at now: Double) -> Double? {
        let inWindow = recent.filter { now - $0 <= Self.rateWindow }
        guard let first = inWindow.first, inWindow.count >= 2 else { return inWindow.isEmpty ? nil : 0 }
        let span = max(now - first, 1)
        return Double(inWindow.count - 1) / min(span, Self.rateWindow)
    }
}

public enum Renderer {
    /// The lines of the terminal view: one bar per topic, then a status line.
    public static func lines(views: [TopicView], status: String, width: Int, height: Int = 1000, now: Double) -> [String] {
        let width = max(20, width)
        var shown = views
        var hidden = 0
        // The block is redrawn by moving the cursor up over it: it must fit on the screen.
        let room = max(1, height - 2)
        if shown.count > room {
            hidden = shown.count - (room - 1)
            shown = Array(shown.prefix(room - 1))
        }
        let topicWidth = min(shown.map { $0.topic.count }.max() ?? 0, max(8, width / 4))
        var out = shown.map { line(for: $0, topicWidth: topicWidth, width: width, now: now) }
        if hidden > 0 { out.append(fit("… and \(hidden) more topics", width)) }
        out.append(fit(status, width))
        return out
    }

    /// `task:42  [##########----------]  50.0%  3/5      1.2/s   4s ago`
    public static func line(for view: TopicView, topicWidth: Int, width: Int, now: Double) -> String {
        let barWidth = width >= 80 ? 24 : max(5, width / 6)
        let name = pad(truncate(view.topic, topicWidth), topicWidth)
        let percentText: String
        switch view.phase {
        case .waiting: percentText = "    -"
        default: percentText = view.percent.map(formatPercent) ?? "    -"
        }
        var message: String
        switch view.phase {
        case .waiting: message = "waiting"
        case .failed: message = "ERROR " + view.message
        case .complete, .running: message = view.message
        }
        message = message.replacingOccurrences(of: "\n", with: " ").replacingOccurrences(of: "\t", with: " ")
        message = String(message.unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7F }.map(Character.init))
        let right: String
        if let last = view.lastEventAt {
            right = pad(formatRate(view.rate(at: now) ?? 0), 8, left: true) + " " + pad(formatAgo(now - last), 8, left: true)
        } else {
            right = ""
        }
        let left = "\(name)  [\(bar(percent: view.phase == .waiting ? nil : view.percent, width: barWidth))] \(pad(percentText, 6, left: true))  "
        let messageWidth = max(0, width - 1 - left.count - right.count - 1)
        if messageWidth < 4 {
            return fit(left + message, width)
        }
        return fit(left + pad(truncate(message, messageWidth), messageWidth) + " " + right, width)
    }

    /// `[#####-----]`'s inside; all dashes when the percentage is unknown.
    public static func bar(percent: Double?, width: Int) -> String {
        let filled = percent.map { Int(($0 / 100 * Double(width)).rounded(.down)) } ?? 0
        let count = min(width, max(0, filled))
        return String(repeating: "#", count: count) + String(repeating: "-", count: width - count)
    }

    /// `60%`, `66.7%`: one decimal, as every emitter sends it, without a needless `.0`.
    public static func formatPercent(_ value: Double) -> String {
        let rounded = (value * 10).rounded() / 10
        if rounded == rounded.rounded() { return "\(Int(rounded))%" }
        return String(format: "%.1f%%", rounded)
    }

    public static func formatRate(_ perSecond: Double) -> String {
        perSecond >= 10 ? "\(Int(perSecond.rounded()))/s" : String(format: "%.1f/s", perSecond)
    }

    public static func formatAgo(_ seconds: Double) -> String {
        let s = max(0, Int(seconds))
        if s < 60 { return "\(s)s ago" }
        if s < 3600 { return "\(s / 60)m ago" }
        return "\(s / 3600)h ago"
    }

    /// One line per event, for a pipe: time, topic, seq, type, percent, message.
    /// `2026-12-07T22:51:02.123Z task:42 1 progress 60% 3/5`
    public static func plainLine(_ event: WatchEvent, at time: Date) -> String {
        var message = (event.message ?? "").replacingOccurrences(of: "\n", with: " ")
        message = message.replacingOccurrences(of: "\r", with: " ")
        let fields = [
            timestamp(time), event.topic, String(event.seq), event.type ?? "-",
            event.percent.map(formatPercent) ?? "-",
        ]
        return (fields.joined(separator: " ") + (message.isEmpty ? "" : " " + message))
    }

    public static func timestamp(_ time: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: time)
    }

    /// The escapes that replace the previous block (`previous` lines, the cursor just below it)
    /// with `lines`, leaving the cursor below the new block.
    public static func redraw(_ lines: [String], previous: Int) -> String {
        var out = previous > 0 ? "\r\u{1B}[\(previous)A" : "\r"
        for line in lines { out += "\u{1B}[2K" + line + "\n" }
        if lines.count < previous { out += "\u{1B}[J" }
        return out
    }

    /// Shown before the first draw and undone at the end: no cursor blinking over the bars.
    public static let hideCursor = "\u{1B}[?25l"
    public static let showCursor = "\u{1B}[0m\u{1B}[?25h"

    static func truncate(_ text: String, _ width: Int) -> String {
        guard text.count > width else { return text }
        guard width > 1 else { return String(text.prefix(width)) }
        return String(text.prefix(width - 1)) + "…"
    }

    static func pad(_ text: String, _ width: Int, left: Bool = false) -> String {
        let fill = String(repeating: " ", count: max(0, width - text.count))
        return left ? fill + text : text + fill
    }

    /// At most `width - 1` characters: writing the last column makes some terminals wrap.
    static func fit(_ text: String, _ width: Int) -> String {
        var text = text
        while text.last == " " { text.removeLast() }
        return truncate(text, width - 1)
    }
}
