// SubscriberSessionHandler: the last handler of a WebSocket subscriber's pipeline
// (SubscriberPipeline.swift). It takes the client's checked input and the hub's answers to
// SubscriberSession, the state machine that holds the subscription rules, and carries out the
// actions it returns: writes, subscriptions, token checks, the close handshake.
//
// Events arrive from the hub already framed, through the loop's LoopSubscribers, which calls
// `deliver` and, once per batch, `flushDelivered`; this handler writes those shared buffers
// unchanged. It never makes the hub wait: when it owes more than `--max-outbound-bytes` of live
// events it is closed with 1013. Writes go out through the context of the pipeline's first
// subscriber handler, so that a live event passes no more handlers on its way out than before
// the checks were split into handlers of their own.

import Logging
import NIOCore
import RelayAuth
import RelayHub

/// Where a subscriber connection touches the hub: HubDriver in the relay, a fake in tests.
protocol SubscriberHub: AnyObject, Sendable {
    /// The registry of subscriber connections on `loop`; call on that loop.
    func registry(on loop: any EventLoop) -> LoopSubscribers
    /// Subscribes; the answer reaches the registry's `subscribed`, in order with fan-out.
    func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?)
    /// Ends subscriptions of a connection that went away (or refused ones); nothing is answered.
    func unsubscribe(_ id: SubscriberID, from names: [String])
    /// Ends one subscription; the answer reaches the registry's `unsubscribed` after every event
    /// of the topic planned for the connection.
    func unsubscribe(_ id: SubscriberID, from name: String, reason: String?)
}

extension HubDriver: SubscriberHub {
    func registry(on loop: any EventLoop) -> LoopSubscribers { registry(on: loopIndex(of: loop)) }
}

/// What every subscriber connection shares.
struct SubscriberEnvironment: Sendable {
    let hub: any SubscriberHub
    /// Checks a refresh token, completing on the given loop (the handshake's token is checked
    /// before the pipeline exists). A future rather than an async function, so that tests answer
    /// on an EmbeddedEventLoop at once.
    let verify: @Sendable (String, any EventLoop) -> EventLoopFuture<Result<Principal, TokenError>>
    let metrics: RelayMetrics
    let maxSubscriptions: Int
    /// Of those, patterns (`--max-pattern-subscriptions`): each one is matched against every
    /// topic that gets an event, so they cost more than exact subscriptions.
    let maxPatternSubscriptions: Int
    let maxOutboundBytes: Int
    let maxMessageBytes: Int
    let logger: Logger
    /// `--ping-interval`, told to the client in its connection's first `subscribed` frame.
    var pingInterval: TimeAmount = RelayConfiguration.defaultPingInterval

    var limits: SubscriberSession.Limits {
        SubscriberSession.Limits(
            maxSubscriptions: maxSubscriptions, maxPatternSubscriptions: maxPatternSubscriptions,
            pingInterval: pingInterval)
    }
}

final class SubscriberSessionHandler: ChannelInboundHandler {
    typealias InboundIn = ClientInput
    typealias OutboundOut = ByteBuffer

    private let environment: SubscriberEnvironment
    private let authentication: Result<Principal, TokenError>
    private let urlTopics: [String]
    private var session: SubscriberSession

    private var context: ChannelHandlerContext?
    /// Where writes start: the first subscriber handler's context (see the file's header).
    private var writer: ChannelHandlerContext?
    private var registry: LoopSubscribers?
    private(set) var id = SubscriberID(loop: 0, serial: 0)
    /// Set once the close frame is written (or the connection dropped): nothing goes out after it.
    private(set) var closing = false
    private var outbound: SubscriberOutbound

    init(environment: SubscriberEnvironment, authentication: Result<Principal, TokenError>, urlTopics: [String]) {
        self.environment = environment
        self.authentication = authentication
        self.urlTopics = urlTopics
        self.session = SubscriberSession(limits: environment.limits, now: .now())
        self.outbound = SubscriberOutbound(maxOutboundBytes: environment.maxOutboundBytes)
    }

    // MARK: Life

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        writer = (try? context.pipeline.syncOperations.context(handlerType: WebSocketFrameCheck.self)) ?? context
        outbound.writable = context.channel.isWritable
        let registry = environment.hub.registry(on: context.eventLoop)
        self.registry = registry
        id = registry.register(self)
        environment.metrics.subscriberConnected(1)
        if case .success(let principal) = authentication {
            environment.logger.debug(
                "subscriber connected", metadata: ["sub": "\(principal.subject)", "peer": "\(peer)", "id": "\(id)"])
        }
        run(session.start(authentication: authentication, urlTopics: urlTopics, clock: .now()))
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        registry?.remove(id)
        environment.hub.unsubscribe(id, from: Array(session.subscriptions))
        environment.metrics.subscriberConnected(-1)
        self.context = nil
        self.writer = nil
    }

    var closeFuture: EventLoopFuture<Void>? { context?.channel.closeFuture }

    private var peer: String { context?.channel.remoteAddress?.description ?? "?" }

    // MARK: Reading

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        run(session.read(Self.unwrapInboundIn(data), now: .now()))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        run(session.readComplete())
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is WebSocketFrameHeard {
            session.heard(now: .now())
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        outbound.writable = context.channel.isWritable
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !closing else { return }
        if let violation = WebSocketMessageCheck.violation(for: error) {
            run(session.fail(violation.code, reason: violation.reason))
        } else {
            environment.logger.debug("subscriber connection error", metadata: ["error": "\(error)", "id": "\(id)"])
            session.closedNow()
            context.close(promise: nil)
        }
    }

    // MARK: The hub's answers (from LoopSubscribers)

    func subscribed(to topic: String, _ subscription: Subscription) {
        guard context != nil else { return }
        run(session.subscribed(to: topic, subscription))
    }

    func unsubscribed(from topic: String, reason: String?) {
        run(session.unsubscribed(from: topic, reason: reason))
    }

    /// Called by the loop's timer: token expiry, then heartbeat.
    func tick(now: NIODeadline, sendPing: Bool, deadAfter: TimeAmount) {
        guard context != nil else { return }
        run(session.tick(now: now, sendPing: sendPing, deadAfter: deadAfter))
    }

    // MARK: Fan-out (from LoopSubscribers)

    /// Live events from a fan-out batch; the loop flushes once after the whole batch.
    func deliver(_ frames: [ByteBuffer], _ range: Range<Int>) {
        guard let writer, !closing else { return }
        for index in range { writer.write(NIOAny(frames[index]), promise: nil) }
    }

    func flushDelivered() {
        guard let writer, !closing else { return }
        writer.flush()
        if outbound.isOverBound(writer) {
            environment.metrics.slowSubscriberClosed()
            environment.logger.info(
                "slow subscriber cut off", metadata: ["id": "\(id)", "owed": "\(outbound.owed(writer))"])
            cut(writer: writer)
        }
    }

    /// Shutdown: a close frame with `code`, behind whatever is queued.
    func close(_ code: CloseCode) {
        run(session.shutDown(code))
    }

    func closeNow() {
        session.closedNow()
        closing = true
        context?.channel.close(promise: nil)
    }

    // MARK: Actions

    private func run(_ actions: [SubscriberSession.Action]) {
        for action in actions { run(action) }
    }

    private func run(_ action: SubscriberSession.Action) {
        guard let writer else { return }
        switch action {
        case .send(let frame):
            send(frame, writer: writer)
        case .ping:
            write(ControlFrame.ping, writer: writer)
        case .subscribe(let topic, let resume):
            environment.hub.subscribe(id, to: topic, resume: resume)
        case .unsubscribe(let topic, let reason):
            environment.hub.unsubscribe(id, from: topic, reason: reason)
        case .release(let topics):
            environment.hub.unsubscribe(id, from: topics)
        case .answerSubscription(let answer, let replay):
            guard !closing else { return }
            if replay.isEmpty { return write(answer, writer: writer) }
            writer.write(NIOAny(answer), promise: nil)
            // Replay may exceed the outbound bound: it is counted apart and released as it drains.
            let bytes = outbound.replayStarted(replay)
            SubscriberOutbound.writeReplay(replay, context: writer) { self.outbound.replayWritten(bytes) }
        case .verify(let token):
            environment.verify(token, writer.eventLoop)
                .assumeIsolated()
                .whenSuccess { result in self.run(self.session.refreshed(result, clock: .now())) }
        case .close(let code, let reason):
            close(code, reason: reason, writer: writer)
        case .drop:
            closing = true
            writer.channel.close(promise: nil)
        case .report(let report):
            self.report(report)
        }
    }

    private func report(_ report: SubscriberSession.Report) {
        switch report {
        case .authFailure(let reason, let message):
            environment.metrics.authFailureClosed(reason: reason)
            if let message {
                environment.logger.info(
                    "subscriber closed", metadata: ["reason": "\(message)", "id": "\(id)", "peer": "\(peer)"])
            }
        case .overRate:
            environment.logger.info("subscriber over its operation rate", metadata: ["id": "\(id)", "peer": "\(peer)"])
        case .unresponsive:
            environment.logger.debug("subscriber did not answer pings", metadata: ["id": "\(id)"])
        }
    }

    /// An answer to the client. Answers count against `--max-outbound-bytes` like live events:
    /// a client that asks and never reads would otherwise grow the relay's memory.
    private func send(_ frame: ByteBuffer, writer: ChannelHandlerContext) {
        write(frame, writer: writer)
        guard !closing, outbound.isOverBound(writer) else { return }
        environment.metrics.slowSubscriberClosed()
        environment.logger.info(
            "subscriber does not read its answers", metadata: ["id": "\(id)", "owed": "\(outbound.owed(writer))"])
        cut(writer: writer)
    }

    /// The slow-subscriber cut: 1013 at once, whatever the session had planned to send next.
    private func cut(writer: ChannelHandlerContext) {
        _ = session.fail(.tryAgainLater, reason: "too slow")
        close(.tryAgainLater, reason: "too slow", writer: writer)
    }

    private func write(_ frame: ByteBuffer, writer: ChannelHandlerContext) {
        guard !closing else { return }
        writer.writeAndFlush(NIOAny(frame), promise: nil)
    }

    /// Sends a close frame behind whatever is queued, then half-closes and lets the
    /// peer finish: closing at once could reset the connection and lose the close frame.
    private func close(_ code: CloseCode, reason: String, writer: ChannelHandlerContext) {
        guard !closing else { return }
        closing = true
        let channel = writer.channel
        let promise = writer.eventLoop.makePromise(of: Void.self)
        writer.writeAndFlush(NIOAny(ControlFrame.close(code, reason: reason)), promise: promise)
        let deadline = writer.eventLoop.scheduleTask(in: .seconds(2)) { channel.close(promise: nil) }
        promise.futureResult.whenComplete { result in
            if case .failure = result {
                deadline.cancel()
                channel.close(promise: nil)
            } else {
                channel.close(mode: .output, promise: nil)
            }
        }
        channel.closeFuture.whenComplete { _ in deadline.cancel() }
    }
}
