// SubscriberSeam: how code outside the relay (the fuzz harness FuzzWebSocket) runs a WebSocket
// subscriber's whole pipeline, as the upgrader installs it after the 101, against a hub of its
// own that answers at once. The in-memory tests use the internal types directly
// (Tests/RelayServerTests/SubscriberTestSupport.swift); this is the smallest public door.

import Logging
import NIOCore
import NIOWebSocket
import RelayAuth
import RelayHub

/// Entry points for running a WebSocket subscriber's pipeline without a relay around it.
@_spi(Testing) public enum SubscriberSeam {
    /// Installs on `channel` what the upgrader installs after the handshake: NIO's frame decoder,
    /// the protocol checks, NIO's frame aggregator and the session. Call on the channel's loop.
    ///
    /// The hub behind it answers every subscribe with `answer` (no replay unless it carries
    /// frames) and every unsubscribe with `unsubscribed`, through the loop's task queue: run the
    /// loop (`EmbeddedEventLoop.run()`) to deliver the answers. A refresh token is accepted when it
    /// equals `validRefreshToken`, with the same principal.
    /// - Parameters:
    ///   - authentication: the handshake's verdict on the token; a failure closes with 4401.
    ///   - topics: the `?topic=`s to start with.
    ///   - maxMessageBytes: `--max-client-message-bytes` (64 KiB in the relay).
    ///   - maxOutboundBytes: `--max-outbound-bytes`.
    /// - Throws: what adding the handlers throws (a closed channel).
    public static func install(
        on channel: any Channel, authentication: Result<Principal, TokenError>, topics: [String] = [],
        maxMessageBytes: Int = 65536, maxOutboundBytes: Int = 1 << 20,
        answer: Subscription = Subscription(epoch: "e", seq: 0, recovered: false, frames: []),
        validRefreshToken: String? = nil
    ) throws {
        let hub = AnsweringHub(
            registry: LoopSubscribers(loopIndex: 0, eventLoop: channel.eventLoop, pingInterval: RelayConfiguration.defaultPingInterval),
            eventLoop: channel.eventLoop, answer: answer)
        let principal = try? authentication.get()
        let environment = SubscriberEnvironment(
            hub: hub,
            verify: { token, loop in
                guard let principal, let validRefreshToken, token == validRefreshToken else {
                    return loop.makeSucceededFuture(.failure(.badSignature))
                }
                return loop.makeSucceededFuture(.success(principal))
            },
            metrics: RelayMetrics(), maxSubscriptions: 100, maxPatternSubscriptions: 8,
            maxOutboundBytes: maxOutboundBytes, maxMessageBytes: maxMessageBytes,
            logger: Logger(label: "progress-relay.subscriber-seam", factory: { _ in SwiftLogNoOpLogHandler() }))
        try channel.pipeline.syncOperations.addHandler(
            ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: maxMessageBytes)))
        try SubscriberPipeline.install(
            on: channel, environment: environment, authentication: authentication, urlTopics: topics)
    }
}

/// A hub that answers every request at once with the same subscription, on the connection's loop.
private final class AnsweringHub: SubscriberHub {
    private let registry: NIOLoopBound<LoopSubscribers>
    private let eventLoop: any EventLoop
    private let answer: Subscription

    init(registry: LoopSubscribers, eventLoop: any EventLoop, answer: Subscription) {
        self.registry = NIOLoopBound(registry, eventLoop: eventLoop)
        self.eventLoop = eventLoop
        self.answer = answer
    }

    func registry(on loop: any EventLoop) -> LoopSubscribers { registry.value }

    func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?) {
        eventLoop.execute { [registry, answer] in registry.value.subscribed(id, to: name, answer) }
    }

    func unsubscribe(_ id: SubscriberID, from names: [String]) {}

    func unsubscribe(_ id: SubscriberID, from name: String, reason: String?) {
        eventLoop.execute { [registry] in registry.value.unsubscribed(id, from: name, reason: reason) }
    }
}
