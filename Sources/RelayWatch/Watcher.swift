// The watch loop: connect, subscribe (resuming where the last connection left off), show each
// event, reconnect with backoff until every exact topic has ended.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

public enum OutputMode: Sendable, Equatable {
    /// Live bars, redrawn in place (standard output is a terminal).
    case bars
    /// One line per event.
    case plain
    /// Every frame as received, one per line.
    case json
}

/// How a watch ends.
public enum WatchEnd: Sendable, Equatable {
    /// Every exact topic ended: 0 all completed, 1 one failed.
    case done(Int32)
    /// The relay refused the token or a topic: retrying cannot help.
    case refused(String)
}

public final class Watcher: Sendable {
    struct State {
        var tracker: ResumeTracker
        var outcome: WatchOutcome
        var views: [TopicView]
        var status = ""
        /// Lines of the block now on screen.
        var drawn = 0
        var dirty = true
        var lastDraw = -Double.infinity
        var width = 80
        var height = 24
        /// Set once the final frame is drawn: nothing may draw after it.
        var closed = false
        var started = false
    }

    let endpoint: RelayEndpoint
    let token: String
    let mode: OutputMode
    let state: NIOLockedValueBox<State>
    let write: @Sendable (String) -> Void
    let note: @Sendable (String) -> Void

    /// `write` takes standard output's text, `note` one line for standard error.
    public init(
        endpoint: RelayEndpoint, token: String, topics: [String], mode: OutputMode,
        write: @escaping @Sendable (String) -> Void, note: @escaping @Sendable (String) -> Void
    ) {
        self.endpoint = endpoint
        self.token = token
        self.mode = mode
        self.write = write
        self.note = note
        let tracker = ResumeTracker(topics: topics)
        var seen = Set<String>()
        let views = tracker.exactTopics.filter { seen.insert($0).inserted }.map(TopicView.init(topic:))
        state = NIOLockedValueBox(
            State(tracker: tracker, outcome: WatchOutcome(exactTopics: tracker.exactTopics), views: views))
    }

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    // MARK: the terminal

    public func resize(width: Int, height: Int) {
        state.withLockedValue {
            $0.width = width
            $0.height = height
            $0.dirty = true
        }
    }

    /// Redraws when something changed, and every second for the "ago" column; at most 10 times a
    /// second as long as it is called every 100 ms.
    public func tick() {
        guard mode == .bars else { return }
        state.withLockedValue { state in
            let now = Self.now()
            guard !state.closed, state.dirty || now - state.lastDraw >= 1 else { return }
            draw(&state, now: now)
        }
    }

    /// The last frame, and the cursor back. Idempotent; safe from a signal handler's queue.
    public func finishDisplay() {
        guard mode == .bars else { return }
        state.withLockedValue { state in
            guard !state.closed else { return }
            if state.started { draw(&state, now: Self.now()) }
            state.closed = true
            write(Renderer.showCursor)
        }
    }

    private func draw(_ state: inout State, now: Double) {
        if !state.started {
            state.started = true
            write(Renderer.hideCursor)
        }
        var status = state.status
        let waitingPatterns = state.tracker.patterns.filter { pattern in
            !state.views.contains { $0.topic.hasPrefix(String(pattern.dropLast())) }
        }
        if !waitingPatterns.isEmpty { status += " · waiting for \(waitingPatterns.joined(separator: ", "))" }
        let lines = Renderer.lines(views: state.views, status: status, width: state.width, height: state.height, now: now)
        write(Renderer.redraw(lines, previous: state.drawn))
        state.drawn = lines.count
        state.dirty = false
        state.lastDraw = now
    }

    private func setStatus(_ text: String) {
        state.withLockedValue {
            $0.status = text
            $0.dirty = true
        }
    }

    // MARK: the connection loop

    public func run() async -> WatchEnd {
        var backoff = Backoff()
        var outage: String?
        var attempts = 0
        while true {
            attempts += 1
            setStatus(
                outage == nil
                    ? "connecting to \(endpoint.description)…"
                    : "reconnecting to \(endpoint.description) (attempt \(attempts)): \(outage!)")
            var problem: String
            var subscribed = false
            do {
                switch try await WatchConnection.connect(to: endpoint, token: token, group: MultiThreadedEventLoopGroup.singleton) {
                case .httpStatus(let status) where status == 401 || status == 403:
                    return .refused("the relay refused the handshake with HTTP \(status) (a token or origin it does not accept)")
                case .httpStatus(let status):
                    problem = "the relay answered HTTP \(status) instead of a WebSocket"
                case .websocket(let channel):
                    switch try await session(channel) {
                    case .finished(let status): return .done(status)
                    case .refused(let message): return .refused(message)
                    case .lost(let reason, let wasSubscribed):
                        problem = reason
                        subscribed = wasSubscribed
                    }
                }
            } catch {
                problem = Self.describe(error)
            }
            if subscribed {
                backoff.reset()
                attempts = 0
            }
            if outage == nil, mode != .bars { note("connection lost (\(problem)); reconnecting") }
            outage = problem
            let delay = backoff.next()
            setStatus("reconnecting to \(endpoint.description) in \(String(format: "%.1f", delay))s: \(problem)")
            try? await Task.sleep(for: .milliseconds(Int(delay * 1000)))
        }
    }

    enum SessionEnd {
        case finished(Int32)
        case refused(String)
        case lost(String, subscribed: Bool)
    }

    /// What one text frame means for the loop.
    enum Step {
        case next
        case finish(Int32)
        case refuse(String)
    }

    private func session(_ channel: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) async throws -> SessionEnd {
        try await channel.executeThenClose { inbound, outbound in
            let ops = state.withLockedValue { $0.tracker.connectionOpened() }
            // A failed write is not the end: the relay may have closed first (a refused token is
            // an error frame and close 4401 right after the handshake), and its close says why.
            for op in ops {
                try? await outbound.write(.client(.text, ByteBuffer(string: op)))
            }
            setStatus("connected to \(endpoint.description)")
            let pinger = Task {
                while !Task.isCancelled {
                    try? await Task.sleep(for: pingEvery)
                    try? await outbound.write(.client(.ping, ByteBuffer()))
                }
            }
            defer { pinger.cancel() }
            var subscribed = false
            var unauthorized: String?
            var message = ByteBuffer()
            var assembling = false
            for try await frame in inbound {
                switch frame.opcode {
                case .text, .continuation:
                    if frame.opcode == .text { message.clear() }
                    guard frame.opcode == .text || assembling else { continue }
                    var data = frame.unmaskedData
                    message.writeBuffer(&data)
                    assembling = !frame.fin
                    guard frame.fin else { continue }
                    let text = String(buffer: message)
                    switch handle(text, subscribed: &subscribed, unauthorized: &unauthorized) {
                    case .next: continue
                    case .finish(let status):
                        try? await outbound.write(.client(.connectionClose, Self.closeBody(.normalClosure)))
                        return .finished(status)
                    case .refuse(let reason):
                        try? await outbound.write(.client(.connectionClose, Self.closeBody(.normalClosure)))
                        return .refused(reason)
                    }
                case .ping:
                    try? await outbound.write(.client(.pong, frame.unmaskedData))
                case .connectionClose:
                    var data = frame.unmaskedData
                    let code = data.readWebSocketErrorCode()
                    let reason = data.readString(length: data.readableBytes) ?? ""
                    try? await outbound.write(.client(.connectionClose, Self.closeBody(code ?? .normalClosure)))
                    let number = code.map { Int(UInt16(webSocketErrorCode: $0)) } ?? 1005
                    switch number {
                    case 4401:
                        return .refused(
                            "the relay refused the token (close 4401: \(unauthorized ?? (reason.isEmpty ? "unauthorized" : reason)));"
                                + " get a fresh one")
                    case 4403:
                        return .refused("the relay refused a topic (close 4403\(reason.isEmpty ? "" : ": " + reason))")
                    default:
                        return .lost("close \(number)\(reason.isEmpty ? "" : ": " + reason)", subscribed: subscribed)
                    }
                default:
                    continue
                }
            }
            return .lost("connection closed", subscribed: subscribed)
        }
    }

    private func handle(_ text: String, subscribed: inout Bool, unauthorized: inout String?) -> Step {
        guard let frame = RelayFrame.decode(text) else { return .next }
        return state.withLockedValue { state -> Step in
            let verdict = state.tracker.receive(frame)
            switch frame {
            case .event(let event):
                guard verdict == .show else { return .next }
                state.outcome.record(event)
                let now = Self.now()
                if let index = state.views.firstIndex(where: { $0.topic == event.topic }) {
                    state.views[index].apply(event, at: now)
                } else {
                    var view = TopicView(topic: event.topic)
                    view.apply(event, at: now)
                    state.views.append(view)
                }
                state.dirty = true
                switch mode {
                case .plain: write(Renderer.plainLine(event, at: Date()) + "\n")
                case .json: write(text + "\n")
                case .bars: break
                }
                if let status = state.outcome.exitStatus { return .finish(status) }
                return .next
            case .subscribed:
                subscribed = true
                if mode == .json { write(text + "\n") }
                return .next
            case .error(let code, let message, let topic):
                if mode == .json { write(text + "\n") }
                if code == "unauthorized" { unauthorized = message }
                if code == "forbidden", let topic {
                    return .refuse("the token does not grant \(topic)\(message.isEmpty ? "" : " (" + message + ")")")
                }
                if code != "unauthorized" {
                    note("the relay answered \(code)\(topic.map { " for " + $0 } ?? ""): \(message)")
                }
                return .next
            case .unsubscribed(let topic, let reason):
                if mode == .json { write(text + "\n") }
                if reason == "forbidden" { return .refuse("the refreshed token no longer grants \(topic)") }
                return .next
            case .other:
                if mode == .json { write(text + "\n") }
                return .next
            }
        }
    }

    static func closeBody(_ code: WebSocketErrorCode) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.write(webSocketErrorCode: code)
        return buffer
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? IOError { return error.description }
        if error is ChannelError { return "\(error)" }
        let text = "\(error)"
        return text.count > 200 ? String(text.prefix(200)) : text
    }
}

extension Watcher {
    /// Exact topics that ended with an error.
    public func failedTopics() -> [String] { state.withLockedValue { $0.outcome.failedTopics } }
}
