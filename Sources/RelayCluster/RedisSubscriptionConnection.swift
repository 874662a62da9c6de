// RedisSubscriptionConnection: the relay's second Redis connection, in pub/sub mode.
//
// Cluster mode delivers events only from this connection, never from script
// replies, so that every relay sees each topic in the order Redis published it.
// It logs in exactly as the command connection does (the same connect and
// AUTH/SELECT/INFO code, then that pipeline stage is swapped for the
// subscription handler) and subscribes to its own probe channel before it is
// handed out, so a liveness probe can always come back.
//
// Like the command connection it does not reconnect. It closes when Redis cuts
// it (CLIENT KILL, a client-output-buffer-limit on a relay too slow to read),
// when the socket fails, or when a liveness probe does not come back; the
// caller learns why from `closeFuture`, makes a new connection, resubscribes
// (in commands of at most 512 channels, which `subscribe` does by itself) and
// repairs its topics.

import Logging
import NIOCore
import NIOPosix
import RESP

/// Why a subscription connection closed without its owner asking.
public enum RedisSubscriptionError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The connection was lost or found unusable (closed by Redis, a socket error, bytes that are
    /// not RESP, a push nobody waited for).
    case connectionLost(RedisConnectionError)
    /// Nothing was read for the probe interval, a probe was published on `probeChannel`, and it
    /// did not come back within `probeTimeout`: this connection does not receive what is
    /// published (e.g. it is attached to a server that is no longer the primary).
    case probeTimedOut(probeChannel: String, probeTimeout: TimeAmount)

    public var description: String {
        switch self {
        case .connectionLost(let error):
            return "the Redis pub/sub connection was lost: \(error)"
        case .probeTimedOut(let channel, let timeout):
            let milliseconds = timeout.nanoseconds / 1_000_000
            return "the Redis pub/sub connection did not receive its probe on \(channel) within \(milliseconds) ms; "
                + "it was closed, reconnect"
        }
    }
}

/// A connection to Redis in pub/sub mode: subscriptions, and the messages they bring.
///
/// Messages (`message` and `pmessage` pushes) are handed to the `onMessage` closure given to
/// ``connect(to:on:probeChannel:probeInterval:probeTimeout:publishProbe:logger:connectTimeout:onMessage:)``,
/// on ``eventLoop``, in the order Redis sent them. Subscription methods may be called from any thread.
public final class RedisSubscriptionConnection: Sendable {
    /// The most channels or patterns one command carries: larger requests go out as several
    /// commands (as Centrifugo resubscribes, in batches of 512).
    public static let maximumChannelsPerCommand = 512
    /// The default time without any read after which a probe is sent.
    public static let defaultProbeInterval: TimeAmount = .seconds(30)
    /// The default time a probe may take to come back.
    public static let defaultProbeTimeout: TimeAmount = .seconds(5)

    /// Where this connection goes.
    public let endpoint: RedisEndpoint
    /// The `run_id` of the Redis server process when the connection was made.
    public let runID: String
    /// The event loop of the channel: `onMessage` runs here, and every future completes here.
    public let eventLoop: any EventLoop
    /// The channel this connection is subscribed to for its liveness probes.
    public let probeChannel: String

    let channel: any Channel
    private let handler: NIOLoopBound<RedisSubscriptionHandler>

    private init(
        endpoint: RedisEndpoint, runID: String, probeChannel: String, channel: any Channel,
        handler: NIOLoopBound<RedisSubscriptionHandler>, closeFuture: EventLoopFuture<Void>
    ) {
        self.closeFuture = closeFuture
        self.endpoint = endpoint
        self.runID = runID
        self.eventLoop = channel.eventLoop
        self.probeChannel = probeChannel
        self.channel = channel
        self.handler = handler
    }

    /// Connects to `endpoint`, logs in as the command connection does (`AUTH`, `SELECT`, reading
    /// `run_id`), subscribes to `probeChannel`, and starts watching for silence.
    ///
    /// - Parameters:
    ///   - endpoint: where Redis is.
    ///   - eventLoop: the event loop of the connection, on which `onMessage` runs.
    ///   - probeChannel: the connection's own channel for liveness probes, `P:probe:<node>`.
    ///     Its messages are consumed here, not handed to `onMessage`.
    ///   - probeInterval: after this long without reading anything, `publishProbe` is called.
    ///   - probeTimeout: when no message on `probeChannel` is read this long after `publishProbe`
    ///     was called, the connection closes itself, and ``closeFuture`` fails with
    ///     ``RedisSubscriptionError/probeTimedOut(probeChannel:probeTimeout:)``.
    ///   - publishProbe: publishes any message on `probeChannel`, through the command connection.
    ///     A failed future is logged; the probe timeout still applies.
    ///   - logger: for connection events.
    ///   - connectTimeout: how long the TCP or Unix socket connect may take.
    ///   - onMessage: called on ``eventLoop`` for every message, in order, with slices of the
    ///     received buffer. It must not block.
    /// - Returns: the connection once the probe channel is confirmed; or a failure: a NIO connect
    ///   error, or ``RedisConnectionError`` (`handshakeFailed` when logging in failed).
    public static func connect(
        to endpoint: RedisEndpoint,
        on eventLoop: any EventLoop,
        probeChannel: String,
        probeInterval: TimeAmount = defaultProbeInterval,
        probeTimeout: TimeAmount = defaultProbeTimeout,
        publishProbe: @escaping @Sendable () -> EventLoopFuture<Void>,
        logger: Logger,
        connectTimeout: TimeAmount = .seconds(5),
        onMessage: @escaping @Sendable (RedisChannelMessage) -> Void
    ) -> EventLoopFuture<RedisSubscriptionConnection> {
        // The login is four commands at most; its replies are small.
        RedisCommandConnection.openLoggedInChannel(
            to: endpoint, on: eventLoop, logger: logger,
            maximumOutstandingCommands: 8, maximumOutstandingBytes: 1 << 16, connectTimeout: connectTimeout
        ).flatMap { opened in
            let channel = opened.channel
            let closePromise = eventLoop.makePromise(of: Void.self)
            let handler = RedisSubscriptionHandler(
                probeChannel: probeChannel, probeInterval: probeInterval, probeTimeout: probeTimeout,
                maximumChannelsPerCommand: maximumChannelsPerCommand,
                publishProbe: publishProbe, onMessage: onMessage, closePromise: closePromise, logger: logger)
            do {
                // From here on pushes go to the subscription handler: the command handler, which
                // would take them for replies nobody asked for, leaves the pipeline.
                let operations = channel.pipeline.syncOperations
                try operations.addHandler(handler, position: .last)
                operations.removeHandler(opened.handler.value, promise: nil)
            } catch {
                channel.close(promise: nil)
                return eventLoop.makeFailedFuture(error)
            }
            guard channel.isActive else {
                channel.close(promise: nil)
                return eventLoop.makeFailedFuture(RedisConnectionError.closed)
            }
            let bound = NIOLoopBound(handler, eventLoop: eventLoop)
            let connection = RedisSubscriptionConnection(
                endpoint: endpoint, runID: opened.runID, probeChannel: probeChannel, channel: channel,
                handler: bound, closeFuture: closePromise.futureResult)
            let subscribed = eventLoop.makePromise(of: Void.self)
            handler.send(.subscribe, [probeChannel], promise: subscribed)
            return subscribed.futureResult
                .map {
                    bound.value.startProbing()
                    return connection
                }
                .flatMapErrorWithEventLoop { error, eventLoop in
                    channel.close(promise: nil)
                    return eventLoop.makeFailedFuture(error)
                }
        }
    }

    /// Subscribes to `channels` (`SUBSCRIBE`, in commands of at most ``maximumChannelsPerCommand``).
    ///
    /// Messages of a channel may arrive as soon as Redis handled its command, before the future
    /// completes.
    ///
    /// - Returns: a future that succeeds when Redis has confirmed every channel (at once for none);
    ///   or fails with ``RedisReplyError`` (e.g. `NOPERM`) or ``RedisConnectionError`` when the
    ///   connection closed first.
    public func subscribe(channels: [String]) -> EventLoopFuture<Void> {
        self.send(.subscribe, channels)
    }

    /// Unsubscribes from `channels` (`UNSUBSCRIBE`, in commands of at most
    /// ``maximumChannelsPerCommand``). No message of a channel arrives after its confirmation;
    /// messages may arrive before the future completes. An empty list sends nothing (it never
    /// means "all", as a bare `UNSUBSCRIBE` would). Leave ``probeChannel`` alone, or probes cannot
    /// come back.
    ///
    /// - Returns: as ``subscribe(channels:)``.
    public func unsubscribe(channels: [String]) -> EventLoopFuture<Void> {
        self.send(.unsubscribe, channels)
    }

    /// Subscribes to the glob `patterns` (`PSUBSCRIBE`); their messages carry the pattern.
    ///
    /// - Returns: as ``subscribe(channels:)``.
    public func psubscribe(patterns: [String]) -> EventLoopFuture<Void> {
        self.send(.psubscribe, patterns)
    }

    /// Unsubscribes from the glob `patterns` (`PUNSUBSCRIBE`). An empty list sends nothing.
    ///
    /// - Returns: as ``subscribe(channels:)``.
    public func punsubscribe(patterns: [String]) -> EventLoopFuture<Void> {
        self.send(.punsubscribe, patterns)
    }

    private func send(_ kind: RedisSubscriptionHandler.Kind, _ names: [String]) -> EventLoopFuture<Void> {
        let promise = self.eventLoop.makePromise(of: Void.self)
        if self.eventLoop.inEventLoop {
            self.handler.value.send(kind, names, promise: promise)
        } else {
            let handler = self.handler
            self.eventLoop.execute {
                handler.value.send(kind, names, promise: promise)
            }
        }
        return promise.futureResult
    }

    /// Subscription commands whose confirmations have not all come. Call on ``eventLoop``.
    public var pendingCommands: Int {
        self.handler.value.pendingCommands
    }

    /// Probes that came back since the connection was made. Call on ``eventLoop``.
    public var probesReturned: Int {
        self.handler.value.probesReturned
    }

    /// Completes when the connection has closed: succeeds when ``close()`` closed it, fails with
    /// ``RedisSubscriptionError`` when anything else did (Redis, the network, a probe that did not
    /// come back). Subscription futures still waiting have failed by then.
    public let closeFuture: EventLoopFuture<Void>

    /// Closes the connection; subscription futures still waiting fail with
    /// ``RedisConnectionError/closed``, and ``closeFuture`` succeeds (unless the connection had
    /// already failed, whose reason it then keeps).
    public func close() -> EventLoopFuture<Void> {
        let handler = self.handler
        let channel = self.channel
        return self.eventLoop.flatSubmit {
            handler.value.closeByOwner()
            return channel.closeFuture
        }
    }
}
