// SSERoute: `GET /sse?topic=T`, the request up to the stream.
//
// Everything that can refuse the request is answered here as an HTTP status with a JSON body
// (`{"error":…,"message":…}`), before the stream starts: an EventSource cannot read a close code,
// only that its request failed. Once authorised, the HTTP codec leaves the pipeline and an
// `SSESubscriberHandler` takes the connection (SSESubscriberHandler.swift).

import Foundation
import NIOCore
import NIOHTTP1
import RelayAuth
import RelayHub

enum SSERoute {
    /// Called by the HTTP handler with the whole request read.
    static func serve(
        _ head: HTTPRequestHead, routes: HTTPRoutes, environment: SSEEnvironment, edge: HTTPEdgeGuard,
        context: ChannelHandlerContext
    ) {
        let target = RequestTarget(head.uri)
        let origin = head.headers.first(name: "origin")
        // A ticket is used once, whatever becomes of the request (as on `/ws`).
        let ticket = target.values("ticket").map { routes.tickets.redeem($0, origin: origin) }.first
        var cors: [(String, String)] = []
        if let origin {
            guard routes.originAllowed(head) else {
                return refuse(head, .forbidden, "forbidden", "origin not allowed", cors: [], edge: edge, context: context)
            }
            // An EventSource `withCredentials` needs the origin named (never `*`) and credentials allowed.
            cors = [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin")]
        }
        guard head.method == .GET else {
            return refuse(
                head, .methodNotAllowed, "method_not_allowed", "GET only", cors: cors + [("Allow", "GET")], edge: edge,
                context: context)
        }
        guard target.query != nil else {
            return refuse(
                head, .badRequest, "bad_request", RequestTarget.malformedQueryMessage, cors: cors, edge: edge,
                context: context)
        }
        let topics = target.values("topic")
        guard topics.count == 1, let topic = topics.first else {
            return refuse(
                head, .badRequest, "bad_request", "one ?topic= (a topic or a pattern) is required", cors: cors, edge: edge,
                context: context)
        }
        guard TopicName.isValidTopicOrPattern(topic) else {
            return refuse(head, .badRequest, "bad_request", "invalid topic", cors: cors, edge: edge, context: context)
        }
        let resume: ResumePoint?
        switch resumePoint(head, target) {
        case .success(let point): resume = point
        case .failure(let why):
            return refuse(head, .badRequest, "bad_request", why.message, cors: cors, edge: edge, context: context)
        }

        // Where the token comes from, best first: a ticket, `?token=`, `Authorization: Bearer`.
        let verifier = routes.verifier
        let authenticated: EventLoopFuture<Result<Principal, TokenError>>
        if let ticket {
            authenticated = context.eventLoop.makeSucceededFuture(ticket)
        } else {
            let token = target.values("token").first ?? HTTPRoutes.bearerToken(head.headers)
            authenticated = context.eventLoop.makeFutureWithTask { await verifier.verify(token) }
        }
        let metrics = environment.metrics
        let logger = environment.logger
        authenticated.assumeIsolated().whenSuccess { result in
            guard context.channel.isActive else { return }
            switch result {
            case .failure(let error):
                metrics.authFailureClosed(reason: error.reason)
                logger.info("sse subscriber refused", metadata: ["reason": "\(error)"])
                refuse(
                    head, .unauthorized, "unauthorized", error.description,
                    cors: cors + [("WWW-Authenticate", "Bearer")], edge: edge, context: context)
            case .success(let principal) where !principal.grants.covers(topic):
                metrics.authFailureClosed(reason: "forbidden")
                refuse(head, .forbidden, "forbidden", "topic not granted", cors: cors, edge: edge, context: context)
            case .success where TopicName.patternPrefix(topic) != nil && environment.maxPatternSubscriptions < 1:
                refuse(
                    head, .forbidden, "too_many_subscriptions", "at most 0 pattern subscriptions", cors: cors,
                    edge: edge, context: context)
            case .success(let principal):
                start(
                    SSESubscriberHandler(
                        environment: environment, principal: principal, topic: topic, resume: resume, extraHeaders: cors),
                    edge: edge, context: context)
            }
        }
    }

    struct BadResume: Error {
        let message: String
    }

    /// `Last-Event-ID` (the browser's reconnect) wins over `?epoch=`/`?since=` (the URL it keeps
    /// reusing). An id that is not the relay's is ignored, as a stale one would be: the stream
    /// starts with the newest event; a malformed `?since=` is refused, as on WebSocket.
    static func resumePoint(_ head: HTTPRequestHead, _ target: RequestTarget) -> Result<ResumePoint?, BadResume> {
        if let last = head.headers.first(name: "last-event-id"), let point = parseEventID(last) {
            return .success(point)
        }
        guard let since = target.values("since").first else { return .success(nil) }
        guard let value = UInt64(since) else {
            return .failure(BadResume(message: "since must be a whole number from 0 to 18446744073709551615"))
        }
        // Without `?epoch=` nothing can be recovered (as a WebSocket subscribe without epoch).
        return .success(ResumePoint(epoch: target.values("epoch").first ?? "", since: value))
    }

    /// `E:S`, or `T E:S` from a pattern stream (the topic, up to the first space, is dropped).
    static func parseEventID(_ id: String) -> ResumePoint? {
        var text = Substring(id.trimmingCharacters(in: .whitespaces))
        if let space = text.firstIndex(of: " ") { text = text[text.index(after: space)...] }
        guard let colon = text.lastIndex(of: ":"), colon != text.startIndex,
            let seq = UInt64(text[text.index(after: colon)...])
        else { return nil }
        return ResumePoint(epoch: String(text[..<colon]), since: seq)
    }

    /// Takes the connection out of HTTP: the codec goes, the stream handler comes.
    private static func start(_ stream: SSESubscriberHandler, edge: HTTPEdgeGuard, context: ChannelHandlerContext) {
        edge.upgraded()
        let pipeline = context.pipeline.syncOperations
        do {
            try pipeline.addHandler(stream)
            if let encoder = try? pipeline.context(handlerType: HTTPResponseEncoder.self) {
                pipeline.removeHandler(context: encoder, promise: nil)
            }
            if let decoder = try? pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self) {
                pipeline.removeHandler(context: decoder, promise: nil)
            }
            if let pipelining = try? pipeline.context(handlerType: HTTPServerPipelineHandler.self) {
                pipeline.removeHandler(context: pipelining, promise: nil)
            }
            if let validator = try? pipeline.context(handlerType: NIOHTTPResponseHeadersValidator.self) {
                pipeline.removeHandler(context: validator, promise: nil)
            }
            if let upgrade = try? pipeline.context(handlerType: HTTPServerUpgradeHandler.self) {
                pipeline.removeHandler(context: upgrade, promise: nil)
            }
            pipeline.removeHandler(context: context, promise: nil)
        } catch {
            context.close(promise: nil)
        }
    }

    /// Answers with `{"error":code,"message":message}`.
    private static func refuse(
        _ request: HTTPRequestHead, _ status: HTTPResponseStatus, _ code: String, _ message: String,
        cors: [(String, String)], edge: HTTPEdgeGuard, context: ChannelHandlerContext
    ) {
        let body = ByteBuffer(string: HTTPHandler.errorJSON(code, message))
        var headers = HTTPHeaders(cors)
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Cache-Control", value: "no-store")
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(
            NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: request.version, status: status, headers: headers))),
            promise: nil)
        if request.method != .HEAD { context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(body))), promise: nil) }
        let done = context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)))
        if keepAlive {
            edge.responseEnded()
        } else {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
