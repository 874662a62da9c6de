// SubscriberPipeline: a WebSocket subscriber's handlers after the handshake, and where its token
// comes from.
//
// The pipeline, in the order bytes go through it (NIOWebSocket's composition):
//
//   ByteToMessageHandler(WebSocketFrameDecoder)  frames, none over the message size (1009)
//   WebSocketFrameCheck                          per-frame rules: mask, RSV bits, opcodes (1002, 1003)
//   NIOWebSocketFrameAggregator                  fragments into messages: at most 128 frames, every
//                                                non-final one of 16 bytes or more, at most the message size
//   WebSocketMessageCheck                        UTF-8 of whole messages, close bodies (1002, 1007);
//                                                NIO's errors into close codes
//   SubscriberSessionHandler                     the subscription rules (SubscriberSession), writes
//
// A hostile client meets the bounds of docs/hardening.md ("WebSocket clients"): fragments (here),
// close frames (ClientClose), operations per second (OperationRate), one pong per read batch, and
// patterns per connection in the session and relay-wide in the hub.

import NIOCore
import NIOHTTP1
import NIOWebSocket
import RelayAuth

enum SubscriberPipeline {
    /// Frames one message may be split into. Browsers never fragment what they send, and client
    /// libraries split at their buffer size (kilobytes): 128 frames of a 64 KiB message is 512
    /// bytes a frame, more than any of them uses.
    static let maxFragments = 128
    /// Smallest non-final fragment. A masked client frame header is 6 to 14 bytes: a fragment
    /// under 16 bytes would carry no more payload than header, which no writer does on purpose.
    /// The final fragment may be any size (it holds whatever is left).
    static let minimumFragmentBytes = 16

    /// Adds the handlers that follow NIO's frame decoder (which the upgrader installs).
    static func install(
        on channel: any Channel, environment: SubscriberEnvironment,
        authentication: Result<Principal, TokenError>, urlTopics: [String]
    ) throws {
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(WebSocketFrameCheck())
        try pipeline.addHandler(
            NIOWebSocketFrameAggregator(
                minNonFinalFragmentSize: minimumFragmentBytes, maxAccumulatedFrameCount: maxFragments,
                maxAccumulatedFrameSize: environment.maxMessageBytes))
        try pipeline.addHandler(WebSocketMessageCheck())
        try pipeline.addHandler(
            SubscriberSessionHandler(environment: environment, authentication: authentication, urlTopics: urlTopics))
    }

    /// The handshake's token, verified. Where it comes from, best first: the subprotocol
    /// `bearer.<JWT>`, a ticket (verified when it was issued, redeemed by the upgrader), `?token=`,
    /// `Authorization: Bearer` (docs/protocol.md, "Where the token goes").
    static func authenticate(
        _ head: HTTPRequestHead, ticket: Result<Principal, TokenError>?,
        verify: @escaping @Sendable (String?) async -> Result<Principal, TokenError>, on eventLoop: any EventLoop
    ) -> EventLoopFuture<Result<Principal, TokenError>> {
        if let bearer = OfferedSubprotocols(head.headers).bearerTokens.first {
            return eventLoop.makeFutureWithTask { await verify(bearer) }
        }
        if let ticket { return eventLoop.makeSucceededFuture(ticket) }
        let token = RequestTarget(head.uri).values("token").first ?? HTTPRoutes.bearerToken(head.headers)
        return eventLoop.makeFutureWithTask { await verify(token) }
    }
}
