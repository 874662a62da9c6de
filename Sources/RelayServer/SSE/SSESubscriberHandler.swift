// SSESubscriberHandler: one `GET /sse` stream, after its request was authorised.
//
// The HTTP codec is gone from the pipeline by then: the answer is written as raw bytes (a
// header block with `Connection: close`, so the body needs no chunk framing and the event
// buffers the hub built once go out unchanged, as WebSocket frames do). The header waits for
// the hub's answer to the subscription, so that a refusal there (the relay-wide pattern bound)
// is still an HTTP status, not a stream that ends at once. Events, heartbeats, token expiry,
// the slow-subscriber bound and shutdown follow the WebSocket subscriber's rules.

import Foundation
import Logging
import NIOCore
import RelayAuth
import RelayHub

/// What every SSE stream shares.
struct SSEEnvironment: Sendable {
    let driver: any SubscriberHub
    let metrics: RelayMetrics
    let maxOutboundBytes: Int
    /// `--max-pattern-subscriptions`: 0 forbids pattern streams.
    let maxPatternSubscriptions: Int
    /// `--sse-retry`, sent as the stream's `retry:` line.
    let retryMilliseconds: Int
    let pingInterval: TimeAmount
    let logger: Logger
}

final class SSESubscriberHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let ping = ByteBuffer(string: ": ping\n\n")
    static let goingAway = ByteBuffer(string: ": relay shutting down\n\n")

    private let environment: SSEEnvironment
    private let principal: Principal
    private let topic: String
    private let resume: ResumePoint?
    /// Header lines (CORS) added to the answer.
    private let extraHeaders: [(String, String)]
    private let expiresAt: NIODeadline?

    private var context: ChannelHandlerContext?
    private var registry: LoopSubscribers?
    private(set) var id = SubscriberID(loop: 0, serial: 0)
    /// The 200 and `event: subscribed` went out: from here on only SSE bytes are written.
    private var started = false
    private(set) var closing = false
    private var subscribed = false
    /// The slow-subscriber bound and the replay it does not count, as on WebSocket.
    private var outbound: SubscriberOutbound

    init(
        environment: SSEEnvironment, principal: Principal, topic: String, resume: ResumePoint?,
        extraHeaders: [(String, String)]
    ) {
        self.environment = environment
        self.principal = principal
        self.topic = topic
        self.resume = resume
        self.extraHeaders = extraHeaders
        self.outbound = SubscriberOutbound(maxOutboundBytes: environment.maxOutboundBytes)
        // Monotonic, from now, as WebSocket sessions: a wall-clock step ends no stream early.
        self.expiresAt = SubscriberSession.deadline(principal, clock: .now())
    }

    var closeFuture: EventLoopFuture<Void>? { context?.channel.closeFuture }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        outbound.writable = context.channel.isWritable
        let registry = environment.driver.registry(on: context.eventLoop)
        self.registry = registry
        id = registry.register(stream: self, pattern: TopicName.patternPrefix(topic) != nil)
        environment.metrics.eventStreamConnected(1)
        subscribed = true
        environment.driver.subscribe(id, to: topic, resume: TopicName.patternPrefix(topic) == nil ? resume : nil)
        environment.logger.debug("sse subscriber connected", metadata: ["sub": "\(principal.subject)", "id": "\(id)"])
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        registry?.remove(id)
        if subscribed { environment.driver.unsubscribe(id, from: [topic]) }
        subscribed = false
        environment.metrics.eventStreamConnected(-1)
        self.context = nil
    }

    /// An SSE client sends nothing after its request; whatever comes is dropped.
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        outbound.writable = context.channel.isWritable
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        environment.logger.debug("sse connection error", metadata: ["error": "\(error)", "id": "\(id)"])
        closing = true
        context.close(promise: nil)
    }

    // MARK: The hub's answers

    func subscribed(to topic: String, _ subscription: Subscription) {
        guard let context, !closing, topic == self.topic else { return }
        if started {
            // Not expected (one subscription per stream); never a second header.
            return
        }
        if subscription.refused {
            // In cluster mode the coordinator still lists the subscription: end it there too.
            environment.driver.unsubscribe(id, from: [topic])
            subscribed = false
            return refuse(
                "503 Service Unavailable", code: "too_many_subscriptions",
                message: "the relay holds all the pattern subscriptions it may", retryAfter: true)
        }
        started = true
        var head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            + "X-Accel-Buffering: no\r\nConnection: close\r\n"
        for (name, value) in extraHeaders { head += name + ": " + value + "\r\n" }
        head += "\r\nretry: \(environment.retryMilliseconds)\n\n"
        context.write(wrapOutboundOut(ByteBuffer(string: head)), promise: nil)
        let json = WebSocketText.payload(
            of: ControlFrame.subscribed(
                topic: topic, subscription: subscription, pingInterval: ControlFrame.seconds(environment.pingInterval)))
        // With nothing to follow, the answer's own position is where a reconnect resumes from
        // (`E:0` for a topic with no event yet); otherwise the events that follow carry it.
        let id = subscription.streamFrames.isEmpty ? subscription.epoch.map { SSEText.id(topic: nil, epoch: $0, seq: subscription.seq) } : nil
        let answer = SSEText.event(name: "subscribed", id: id, json: json)
        guard !subscription.streamFrames.isEmpty else {
            context.writeAndFlush(wrapOutboundOut(answer), promise: nil)
            return
        }
        context.write(wrapOutboundOut(answer), promise: nil)
        // Replay and snapshots do not count against the outbound bound, as on WebSocket.
        let bytes = outbound.replayStarted(subscription.streamFrames)
        SubscriberOutbound.writeReplay(subscription.streamFrames, context: context) { self.outbound.replayWritten(bytes) }
    }

    /// A stream holds its one subscription for its whole life; nothing unsubscribes it but its end.
    func unsubscribed(from topic: String, reason: String?) {}

    // MARK: Fan-out

    func deliver(_ frames: [EventStreamFrames?], _ range: Range<Int>, for id: SubscriberID) {
        guard let context, started, !closing else { return }
        for index in range where index < frames.count {
            if let frame = frames[index]?.frame(for: id) { context.write(wrapOutboundOut(frame), promise: nil) }
        }
    }

    func flushDelivered() {
        guard let context, !closing else { return }
        context.flush()
        if outbound.isOverBound(context) {
            // Cut without a last event: the client is behind; its reconnect resumes with Last-Event-ID.
            environment.metrics.slowSubscriberClosed()
            environment.logger.info(
                "slow sse subscriber cut off", metadata: ["id": "\(id)", "owed": "\(outbound.owed(context))"])
            closeNow()
        }
    }

    // MARK: Timers and ends

    func tick(now: NIODeadline, sendPing: Bool) {
        guard let context, started, !closing else { return }
        if let expiresAt, now >= expiresAt {
            environment.metrics.authFailureClosed(reason: "expired")
            environment.logger.info("sse subscriber closed", metadata: ["reason": "token expired", "id": "\(id)"])
            let json = WebSocketText.payload(of: ControlFrame.error(.unauthorized, "token expired"))
            return finish(with: SSEText.event(name: "error", id: nil, json: json))
        }
        if sendPing { context.writeAndFlush(wrapOutboundOut(Self.ping), promise: nil) }
    }

    /// Shutdown: a comment says why, then the stream ends; the browser reconnects and resumes.
    func shutDown() {
        guard started else { return closeNow() }
        finish(with: Self.goingAway)
    }

    func closeNow() {
        closing = true
        context?.channel.close(promise: nil)
    }

    /// Writes `last` behind whatever is queued, then closes once it is out (at most 2 s later).
    private func finish(with last: ByteBuffer) {
        guard let context, !closing else { return }
        closing = true
        let channel = context.channel
        let deadline = context.eventLoop.scheduleTask(in: .seconds(2)) { channel.close(promise: nil) }
        context.writeAndFlush(wrapOutboundOut(last)).whenComplete { _ in
            deadline.cancel()
            channel.close(promise: nil)
        }
    }

    /// An HTTP refusal, when the header has not gone out yet.
    private func refuse(_ status: String, code: String, message: String, retryAfter: Bool) {
        let body = HTTPHandler.errorJSON(code, message)
        var head = "HTTP/1.1 \(status)\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n"
        if retryAfter { head += "Retry-After: 1\r\n" }
        for (name, value) in extraHeaders { head += name + ": " + value + "\r\n" }
        finish(with: ByteBuffer(string: head + "\r\n" + body))
    }
}
