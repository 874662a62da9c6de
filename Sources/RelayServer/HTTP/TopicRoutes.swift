// TopicRoutes: `GET /topics/{topic}` (the newest event, with an ETag) and
// `GET /topics/{topic}/events?epoch=&since=&wait=` (the events after `since`, long-polled),
// for clients that cannot keep a WebSocket open. docs/protocol.md, "Topics over plain HTTP".
//
// The checks and the answers' shapes are here; reading the hub and waiting are the hub loop's
// (LongPollWaiters.swift). Nothing here blocks the connection's loop: a waiting poll is a promise.

import Foundation
import NIOCore
import NIOHTTP1
import RelayAuth
import RelayHub

enum TopicRoutes {
    /// The longest `wait` a poll may ask for: under the 60 s idle timeout of common proxies.
    static let maximumWait = 60

    private enum Route {
        case latest(String)
        case events(String)
    }

    /// Serves a request whose path starts with `/topics/`.
    static func serve(
        _ head: HTTPRequestHead, routes: HTTPRoutes, longPoll: LongPoll, edge: HTTPEdgeGuard,
        context: ChannelHandlerContext
    ) {
        let writer = TopicResponder(head: head, edge: edge)
        let target = RequestTarget(head.uri)
        var cors: [(String, String)] = []
        if let origin = head.headers.first(name: "origin") {
            guard routes.originAllowed(head) else {
                return writer.error(.forbidden, "forbidden", "origin not allowed", context: context)
            }
            cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"), ("Access-Control-Expose-Headers", "ETag")]
        }
        writer.cors = cors
        if head.method == .OPTIONS {
            return writer.write(
                .noContent, body: nil,
                extra: [
                    ("Access-Control-Allow-Methods", "GET"),
                    ("Access-Control-Allow-Headers", "Authorization, If-None-Match"), ("Access-Control-Max-Age", "600"),
                ], context: context)
        }
        guard head.method == .GET || head.method == .HEAD else {
            return writer.error(
                .methodNotAllowed, "method_not_allowed", "only GET", extra: [("Allow", "GET, HEAD, OPTIONS")],
                context: context)
        }
        guard target.query != nil else {
            return writer.error(.badRequest, "bad_request", RequestTarget.malformedQueryMessage, context: context)
        }

        // A topic may hold `/`: in the path it is `%2F`, so a raw `/` only separates `events`.
        let segments = target.path.dropFirst("/topics/".count).split(separator: "/", omittingEmptySubsequences: false)
        let route: Route
        switch segments.count {
        case 1 where !segments[0].isEmpty:
            guard let topic = PercentDecoding.decode(segments[0]) else {
                return writer.error(.badRequest, "bad_request", "malformed percent-escape in the topic", context: context)
            }
            route = .latest(topic)
        case 2 where !segments[0].isEmpty && segments[1] == "events":
            guard let topic = PercentDecoding.decode(segments[0]) else {
                return writer.error(.badRequest, "bad_request", "malformed percent-escape in the topic", context: context)
            }
            route = .events(topic)
        default:
            return writer.error(.notFound, "not_found", "no such route", context: context)
        }
        let topic: String
        switch route {
        case .latest(let name):
            topic = name
            longPoll.metrics.topicRequest(route: "topic")
        case .events(let name):
            topic = name
            longPoll.metrics.topicRequest(route: "topic_events")
        }
        guard TopicName.isValidTopic(topic) else {
            return writer.error(
                .badRequest, "bad_request", "not a topic: 1 to 256 bytes of A-Z a-z 0-9 _ - . : / @ =", context: context)
        }

        var resume: ResumePoint?
        var wait = 0
        if case .events = route {
            let epoch = target.values("epoch").first
            if let text = target.values("since").first {
                guard let since = UInt64(text) else {
                    return writer.error(
                        .badRequest, "bad_request", "since must be a whole number from 0 to 18446744073709551615",
                        context: context)
                }
                // As a subscribe: a since without its epoch cannot be resumed (recovered:false).
                resume = ResumePoint(epoch: epoch ?? "", since: since)
            }
            if let text = target.values("wait").first {
                guard let seconds = Int(text), (0...maximumWait).contains(seconds) else {
                    return writer.error(
                        .badRequest, "bad_request", "wait must be a whole number of seconds from 0 to \(maximumWait)",
                        context: context)
                }
                wait = seconds
            }
        }

        let token = HTTPRoutes.bearerToken(head.headers) ?? target.values("token").first
        let verifier = routes.verifier
        context.eventLoop.makeFutureWithTask { await verifier.verify(token) }.assumeIsolated().whenSuccess { result in
            let principal: Principal
            switch result {
            case .failure(let error):
                return writer.error(
                    .unauthorized, "unauthorized", error.description, extra: [("WWW-Authenticate", "Bearer")],
                    context: context)
            case .success(let granted):
                principal = granted
            }
            guard principal.grants.covers(topic) else {
                return writer.error(.forbidden, "forbidden", "topic not granted", context: context)
            }
            switch route {
            case .latest:
                longPoll.latest(topic, on: context.eventLoop).assumeIsolated().whenSuccess { answer in
                    writer.latest(topic, answer, context: context)
                }
            case .events:
                let poll = longPoll.poll(
                    topic, resume: resume, wait: .seconds(Int64(wait)), subject: principal.subject, on: context.eventLoop)
                let id = poll.id
                if wait > 0 { context.channel.closeFuture.whenComplete { _ in longPoll.cancel(id) } }
                poll.answer.assumeIsolated().whenSuccess { answer in
                    writer.events(topic, resume: resume, answer, context: context)
                }
            }
        }
    }

    /// `"<epoch>:<seq>"`: changes with every event and with every new numbering of the topic.
    static func entityTag(_ position: TopicPosition) -> String { "\"\(position.epoch):\(position.seq)\"" }

    /// Whether `If-None-Match` names `tag` (or is `*`); weak tags compare as strong ones here.
    static func matches(_ header: String?, _ tag: String) -> Bool {
        guard let header else { return false }
        for item in header.split(separator: ",") {
            var candidate = item.trimmingCharacters(in: .whitespaces)
            if candidate == "*" { return true }
            if candidate.hasPrefix("W/") { candidate.removeFirst(2) }
            if candidate == tag { return true }
        }
        return false
    }
}

/// Writes one request's answer on the connection's loop. Used there only, like the handler.
final class TopicResponder {
    private let head: HTTPRequestHead
    private let edge: HTTPEdgeGuard
    var cors: [(String, String)] = []

    init(head: HTTPRequestHead, edge: HTTPEdgeGuard) {
        self.head = head
        self.edge = edge
    }

    func latest(_ topic: String, _ answer: TopicAnswer, context: ChannelHandlerContext) {
        switch answer {
        case .read(.events(let position, _, let frames)) where !frames.isEmpty:
            let tag = TopicRoutes.entityTag(position)
            if TopicRoutes.matches(head.headers.first(name: "if-none-match"), tag) {
                return write(.notModified, body: nil, extra: [("ETag", tag)], context: context)
            }
            var body = ByteBuffer()
            body.writeString("{\"topic\":" + WebSocketText.jsonString(topic) + ",\"epoch\":" + WebSocketText.jsonString(position.epoch))
            body.writeString(",\"seq\":\(position.seq),\"event\":")
            var event = WebSocketText.payload(of: frames[frames.count - 1])
            body.writeBuffer(&event)
            body.writeString("}")
            write(.ok, body: body, extra: [("ETag", tag)], context: context)
        case .read:
            error(.notFound, "not_found", "the relay holds no event of this topic", context: context)
        case .tooManyWaiters, .cancelled:
            // Not reached: a read of the newest event never waits.
            error(.internalServerError, "internal", "unexpected answer", context: context)
        case .unavailable(let reason):
            error(.serviceUnavailable, "unavailable", reason, extra: [("Retry-After", "1")], context: context)
        }
    }

    func events(_ topic: String, resume: ResumePoint?, _ answer: TopicAnswer, context: ChannelHandlerContext) {
        let position: TopicPosition
        let recovered: Bool
        let frames: [ByteBuffer]
        switch answer {
        case .read(.notHeld):
            return error(.notFound, "not_found", "the relay holds no event of this topic", context: context)
        case .read(.upToDate(let at)):
            position = at
            recovered = resume.map { $0.epoch == at.epoch } ?? false
            frames = []
        case .read(.events(let at, let wasRecovered, let found)):
            position = at
            recovered = wasRecovered
            frames = found
        case .tooManyWaiters:
            return error(
                .tooManyRequests, "too_many_subscriptions",
                "this token holds --max-subscriptions long-polls already", extra: [("Retry-After", "1")], context: context)
        case .unavailable(let reason):
            return error(.serviceUnavailable, "unavailable", reason, extra: [("Retry-After", "1")], context: context)
        case .cancelled:
            return
        }
        var body = ByteBuffer()
        body.writeString("{\"topic\":" + WebSocketText.jsonString(topic) + ",\"epoch\":" + WebSocketText.jsonString(position.epoch))
        body.writeString(",\"seq\":\(position.seq),\"recovered\":\(recovered),\"events\":[")
        for (index, frame) in frames.enumerated() {
            if index > 0 { body.writeString(",") }
            var event = WebSocketText.payload(of: frame)
            body.writeBuffer(&event)
        }
        body.writeString("]}")
        write(.ok, body: body, context: context)
    }

    func error(
        _ status: HTTPResponseStatus, _ code: String, _ message: String, extra: [(String, String)] = [],
        context: ChannelHandlerContext
    ) {
        write(status, body: ByteBuffer(string: HTTPHandler.errorJSON(code, message)), extra: extra, context: context)
    }

    func write(
        _ status: HTTPResponseStatus, body: ByteBuffer?, extra: [(String, String)] = [], context: ChannelHandlerContext
    ) {
        guard context.channel.isActive else { return }
        var headers = HTTPHeaders(cors + extra)
        if let body {
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Content-Length", value: String(body.readableBytes))
        } else if status != .notModified && status != .noContent {
            headers.add(name: "Content-Length", value: "0")
        }
        // Revalidate every time: the newest event changes without notice; the ETag makes that cheap.
        headers.add(name: "Cache-Control", value: "no-cache")
        let keepAlive = head.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if let body, head.method != .HEAD {
            context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(body))), promise: nil)
        }
        let done = context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        } else {
            edge.responseEnded()
        }
    }
}
