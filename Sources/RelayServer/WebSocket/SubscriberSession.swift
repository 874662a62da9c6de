// SubscriberSession: the rules of one WebSocket subscriber's session, as a state machine that
// does no I/O. Each input (the token's verdict, a client message, the hub's answer, a tick of
// the loop's timer) returns the actions to take; SubscriberSessionHandler takes them. The clock
// is an argument, so tests drive expiry, refresh, heartbeat and the operation rate by hand.
//
// States: `idle` until the handler is added; `open` with a verified token; `closing` once a
// close frame is owed or sent (a refused token goes straight there), after which every input is
// ignored: the relay sends one close frame and nothing after it. The subscriptions outlive the
// open state, so that the handler can release them from the hub when the connection goes.

import Foundation
import NIOCore
import RelayAuth
import RelayHub

struct SubscriberSession {
    /// What the session does next, in order.
    enum Action: Equatable {
        /// An answer to the client, flushed at once; it counts against `--max-outbound-bytes`.
        case send(ByteBuffer)
        /// A heartbeat ping, flushed at once.
        case ping
        /// Asks the hub; its answer comes back through `subscribed(to:_:)`.
        case subscribe(topic: String, resume: ResumePoint?)
        /// Ends one subscription; the hub answers through `unsubscribed(from:reason:)`, after
        /// every event of the topic it had planned for this connection.
        case unsubscribe(topic: String, reason: String?)
        /// Ends subscriptions in the hub without an answer.
        case release([String])
        /// A `subscribed` frame, then the replay or snapshot behind it (not counted against the bound).
        case answerSubscription(ByteBuffer, replay: [ByteBuffer])
        /// Verifies a refresh token; the verdict comes back through `refreshed(_:clock:)`.
        case verify(token: String)
        /// Sends a close frame and ends the connection once it is out.
        case close(CloseCode, reason: String)
        /// Ends the connection without a close frame (a peer that answers no pings).
        case drop
        /// For the logs and metrics only.
        case report(Report)
    }

    enum Report: Equatable {
        /// A token refused, missing, expired or not covering a `?topic=`: counted by reason.
        case authFailure(reason: String, message: String?)
        case overRate
        case unresponsive
    }

    /// The session's bounds (from `serve`'s flags).
    struct Limits {
        var maxSubscriptions: Int
        /// Of those, patterns (`--max-pattern-subscriptions`).
        var maxPatternSubscriptions: Int
        /// `--ping-interval`, told to the client in its connection's first `subscribed` frame.
        var pingInterval: TimeAmount
        /// At most one `refresh` per this long: each costs a signature check.
        var refreshInterval = TimeAmount.seconds(10)
    }

    /// Now, on both clocks: token ends are wall-clock times, timed on the monotonic clock from
    /// when the token was checked, so a step of the wall clock ends no session early or late.
    struct Clock {
        var monotonic: NIODeadline
        /// Seconds since 1970.
        var wall: Double

        static func now() -> Clock { Clock(monotonic: .now(), wall: Date().timeIntervalSince1970) }
    }

    private enum State {
        case idle
        case open(Open)
        case closing
    }

    private struct Open {
        var principal: Principal
        /// When the token's `exp` (plus leeway) passes, on the monotonic clock.
        var expiresAt: NIODeadline?
        /// A refresh token is being verified: expiry waits for its verdict.
        var refreshing = false
        var lastRefresh: NIODeadline?
    }

    let limits: Limits
    private var state = State.idle
    /// Topics and patterns this connection holds in the hub (or has asked for).
    private(set) var subscriptions = Set<String>()
    /// Whether a `subscribed` frame has carried `ping_interval` on this connection (the first does).
    private var toldPingInterval = false
    private var rate: OperationRate
    private(set) var lastHeard: NIODeadline
    /// The payload of the newest ping of this read batch: answered once, at the batch's end
    /// (RFC 6455 5.5.3 allows answering only the most recent ping), so a ping flood costs one
    /// pong per batch, not one per ping.
    private var pendingPong: ByteBuffer?

    init(limits: Limits, now: NIODeadline) {
        self.limits = limits
        self.rate = OperationRate(now: now)
        self.lastHeard = now
    }

    var isClosing: Bool {
        if case .closing = state { return true }
        return false
    }

    // MARK: Life

    /// The handshake's verdict on the token, and the `?topic=`s to start with.
    mutating func start(authentication: Result<Principal, TokenError>, urlTopics: [String], clock: Clock) -> [Action] {
        guard case .idle = state else { return [] }
        switch authentication {
        case .failure(let error):
            state = .closing
            return [
                .report(.authFailure(reason: error.reason, message: error.description)),
                .send(ControlFrame.error(.unauthorized, error.description)), .close(.unauthorized, reason: ""),
            ]
        case .success(let principal):
            state = .open(Open(principal: principal, expiresAt: Self.deadline(principal, clock: clock)))
            if let refused = urlTopics.first(where: {
                !principal.grants.covers($0) || !TopicName.isValidTopicOrPattern($0)
            }) {
                state = .closing
                return [
                    .report(.authFailure(reason: "forbidden", message: nil)),
                    .send(ControlFrame.error(.forbidden, "topic not granted", topic: refused)),
                    .close(.forbidden, reason: ""),
                ]
            }
            return urlTopics.flatMap { subscribe($0, resume: nil) }
        }
    }

    /// The relay shuts down, or the registry closes every connection: one close frame.
    mutating func shutDown(_ code: CloseCode) -> [Action] {
        guard !isClosing else { return [] }
        state = .closing
        return [.close(code, reason: "")]
    }

    /// The connection closes at once (the end of shutdown, or an I/O error).
    mutating func closedNow() {
        state = .closing
    }

    // MARK: Reading

    /// A whole frame came in (fragments included): the client is alive.
    mutating func heard(now: NIODeadline) {
        lastHeard = now
    }

    /// A client's input, after the protocol checks.
    mutating func read(_ input: ClientInput, now: NIODeadline) -> [Action] {
        guard !isClosing else { return [] }
        switch input {
        case .text(let payload):
            if let overRate = take(now: now) { return overRate }
            return message(Array(payload.readableBytesView), now: now)
        case .ping(let payload):
            if let overRate = take(now: now) { return overRate }
            pendingPong = payload
            return []
        case .pong:
            return take(now: now) ?? []
        case .close(let code, let reason):
            return fail(code, reason: reason)
        }
    }

    /// The end of a read batch: the newest ping's pong, if one is owed.
    mutating func readComplete() -> [Action] {
        guard let payload = pendingPong else { return [] }
        pendingPong = nil
        guard !isClosing else { return [] }
        return [.send(ControlFrame.pong(payload: payload))]
    }

    /// The client broke a protocol rule: one close frame with its code.
    mutating func fail(_ code: CloseCode, reason: String) -> [Action] {
        guard !isClosing else { return [] }
        state = .closing
        return [.close(code, reason: reason)]
    }

    /// Counts one operation; past the rate the connection is closed with 1008 (policy violation).
    private mutating func take(now: NIODeadline) -> [Action]? {
        guard rate.take(now: now) else {
            state = .closing
            return [
                .report(.overRate),
                .close(.policyViolation, reason: "more than \(OperationRate.perSecond) operations a second"),
            ]
        }
        return nil
    }

    private mutating func message(_ bytes: [UInt8], now: NIODeadline) -> [Action] {
        guard case .open(var open) = state else { return [] }
        switch ClientMessage.parse(bytes) {
        case .success(.subscribe(let topic, let resume)):
            return subscribe(topic, resume: resume)
        case .success(.unsubscribe(let topic)):
            subscriptions.remove(topic)
            return [.unsubscribe(topic: topic, reason: nil)]
        case .success(.refresh(let token)):
            if let last = open.lastRefresh, now - last < limits.refreshInterval {
                return [.send(ControlFrame.error(.badRequest, "at most one refresh per 10 s"))]
            }
            open.lastRefresh = now
            open.refreshing = true
            state = .open(open)
            return [.verify(token: token)]
        case .success(.ping):
            return [.send(ControlFrame.pong)]
        case .failure(.badRequest(let why)):
            return [.send(ControlFrame.error(.badRequest, why))]
        case .failure(.unknownOp(let op)):
            return [.send(ControlFrame.error(.unknownOp, "unknown op " + op))]
        }
    }

    // MARK: Subscriptions

    private mutating func subscribe(_ topic: String, resume: ResumePoint?) -> [Action] {
        guard case .open(let open) = state else { return [] }
        guard TopicName.isValidTopicOrPattern(topic) else {
            return [.send(ControlFrame.error(.badRequest, "invalid topic", topic: topic))]
        }
        guard open.principal.grants.covers(topic) else {
            return [.send(ControlFrame.error(.forbidden, "topic not granted", topic: topic))]
        }
        if !subscriptions.contains(topic), subscriptions.count >= limits.maxSubscriptions {
            return [
                .send(
                    ControlFrame.error(
                        .tooManySubscriptions, "at most \(limits.maxSubscriptions) subscriptions", topic: topic))
            ]
        }
        if !subscriptions.contains(topic), TopicName.patternPrefix(topic) != nil,
            subscriptions.count(where: { TopicName.patternPrefix($0) != nil }) >= limits.maxPatternSubscriptions
        {
            return [
                .send(
                    ControlFrame.error(
                        .tooManySubscriptions, "at most \(limits.maxPatternSubscriptions) pattern subscriptions",
                        topic: topic))
            ]
        }
        subscriptions.insert(topic)
        return [.subscribe(topic: topic, resume: resume)]
    }

    /// The hub's answer to a subscription, in order with live events.
    mutating func subscribed(to topic: String, _ subscription: Subscription) -> [Action] {
        guard !isClosing, subscriptions.contains(topic) else { return [] }
        if subscription.refused {
            // The relay-wide pattern bound; in cluster mode the coordinator still lists the
            // subscription, so it is ended there too (the hub holds nothing to end).
            subscriptions.remove(topic)
            return [
                .release([topic]),
                .send(
                    ControlFrame.error(
                        .tooManySubscriptions, "the relay holds all the pattern subscriptions it may", topic: topic)),
            ]
        }
        let pingInterval = toldPingInterval ? nil : ControlFrame.seconds(limits.pingInterval)
        toldPingInterval = true
        let answer = ControlFrame.subscribed(topic: topic, subscription: subscription, pingInterval: pingInterval)
        return [.answerSubscription(answer, replay: subscription.frames)]
    }

    /// The hub's answer to an unsubscribe, after every event it had planned for this topic.
    func unsubscribed(from topic: String, reason: String?) -> [Action] {
        guard !isClosing, !subscriptions.contains(topic) else { return [] }
        return [.send(ControlFrame.unsubscribed(topic: topic, reason: reason))]
    }

    // MARK: Refresh, expiry, heartbeat

    /// The verdict on a refresh token.
    mutating func refreshed(_ result: Result<Principal, TokenError>, clock: Clock) -> [Action] {
        guard case .open(var open) = state else { return [] }
        open.refreshing = false
        state = .open(open)
        let fresh: Principal
        switch result {
        case .failure(let error):
            return refuse(error.reason, message: error.description)
        case .success(let principal) where principal.subject != open.principal.subject:
            return refuse("malformed", message: "refresh token names another sub")
        case .success(let principal):
            fresh = principal
        }
        open.principal = fresh
        open.expiresAt = Self.deadline(fresh, clock: clock)
        state = .open(open)
        var actions: [Action] = [.send(ControlFrame.refreshed(exp: fresh.expiresAt))]
        for topic in subscriptions.sorted() where !fresh.grants.covers(topic) {
            subscriptions.remove(topic)
            actions.append(.unsubscribe(topic: topic, reason: "forbidden"))
        }
        return actions
    }

    /// The loop's timer: token expiry, then, when `sendPing`, the heartbeat. A client heard from
    /// within `deadAfter` gets a ping; one that was not is dropped.
    mutating func tick(now: NIODeadline, sendPing: Bool, deadAfter: TimeAmount) -> [Action] {
        guard case .open(let open) = state else { return [] }
        if let expiresAt = open.expiresAt, !open.refreshing, now >= expiresAt {
            return refuse("expired", message: "token expired")
        }
        guard sendPing else { return [] }
        if now - lastHeard > deadAfter {
            state = .closing
            return [.report(.unresponsive), .drop]
        }
        return [.ping]
    }

    private mutating func refuse(_ reason: String, message: String) -> [Action] {
        state = .closing
        return [
            .report(.authFailure(reason: reason, message: message)),
            .send(ControlFrame.error(.unauthorized, message)), .close(.unauthorized, reason: ""),
        ]
    }

    /// The monotonic deadline of the token's end; nil for a token without one.
    static func deadline(_ principal: Principal, clock: Clock) -> NIODeadline? {
        guard let until = principal.validUntil else { return nil }
        // Capped at ten years, within TimeAmount's range.
        let seconds = min(max(0, until - clock.wall), 315_360_000)
        return clock.monotonic + .nanoseconds(Int64(seconds * 1e9))
    }
}
