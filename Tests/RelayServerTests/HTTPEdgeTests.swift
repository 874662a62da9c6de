// HTTPEdgeTests: the HTTP side of a connection in an EmbeddedChannel, built as the relay builds
// it (HTTPEdgeGuard, NIO's codec with the relay's decoder limits, HTTPHandler): what the edge
// answers to a request over its limits (docs/protocol.md, "Answers before the upgrade"), and the
// 400 for a malformed percent-escape in a query.

import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import RelayAuth
import Testing

@testable import RelayServer

private let secret = Array(repeating: UInt8(ascii: "k"), count: 32)

/// One HTTP connection in memory, with the relay's handlers and no `/topics`, `/sse` or upgrade.
private struct HTTPConnection {
    let channel: EmbeddedChannel
    let loop: EmbeddedEventLoop

    init(verifier: TokenVerifier, settings: HTTPEdgeSettings = HTTPEdgeSettings()) throws {
        let routes = HTTPRoutes(
            origins: OriginPolicy(allowed: []), metricsText: { "" },
            statsJSON: { fatalError("not served in these tests") }, readiness: { fatalError("not served in these tests") },
            tickets: TicketStore(), verifier: verifier,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        loop = EmbeddedEventLoop()
        channel = EmbeddedChannel(loop: loop)
        let edge = HTTPEdgeGuard(limits: ConnectionLimits(settings: settings, metrics: RelayMetrics()))
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(edge)
        try pipeline.configureHTTPServerPipeline(
            withServerUpgrade: nil, withErrorHandling: false, withEncoderConfiguration: .init(),
            withDecoderLimitConfiguration: HTTPEdgeSettings.decoderLimits)
        try pipeline.addHandler(HTTPHandler(routes: routes, edge: edge))
        try channel.connect(to: SocketAddress(ipAddress: "192.0.2.7", port: 40000)).wait()
    }

    /// Sends `bytes` in reads of at most `chunk` bytes; stops once the connection is closed.
    func send(_ bytes: [UInt8], chunk: Int = .max) throws {
        var start = 0
        while start < bytes.count, channel.isActive {
            let end = min(start + chunk, bytes.count)
            try channel.writeInbound(channel.allocator.buffer(bytes: bytes[start..<end]))
            start = end
        }
    }

    func send(_ text: String, chunk: Int = .max) throws { try send(Array(text.utf8), chunk: chunk) }

    /// Everything written to the client so far, as text.
    func received() throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            text += String(decoding: buffer.readableBytesView, as: UTF8.self)
        }
        return text
    }
}

/// A response's status code, headers (lowercased names) and body.
private func response(_ text: String) throws -> (status: Int, headers: [String: String], body: String) {
    let parts = text.components(separatedBy: "\r\n\r\n")
    try #require(parts.count >= 2, "a whole response: \(text.debugDescription)")
    let lines = parts[0].components(separatedBy: "\r\n")
    let statusLine = lines[0].split(separator: " ")
    let status = try #require(Int(statusLine.count > 1 ? statusLine[1] : ""))
    var headers: [String: String] = [:]
    for line in lines.dropFirst() {
        guard let colon = line.firstIndex(of: ":") else { continue }
        headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    return (status, headers, parts.dropFirst().joined(separator: "\r\n\r\n"))
}

@Suite struct HTTPEdgeTests {
    private static func verifier() async throws -> TokenVerifier {
        try await TokenVerifier(key: .secret(secret), grantTemplates: [])
    }

    @Test func aPlainRequestIsServedAndTheConnectionKept() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        let answer = try response(try connection.received())
        #expect(answer.status == 200 && answer.body == "ok")
        #expect(connection.channel.isActive)
        _ = try connection.channel.finish()
    }

    @Test(arguments: [1, 7, 1000, Int.max])
    func aRequestLineOver8KiBIs414(chunk: Int) async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        let line = "GET /healthz?" + String(repeating: "a", count: 9 * 1024) + " HTTP/1.1\r\nHost: relay\r\n\r\n"
        try connection.send(line, chunk: chunk)
        let answer = try response(try connection.received())
        #expect(answer.status == 414)
        #expect(answer.body == "request line over 8 KiB\n")
        #expect(answer.headers["connection"] == "close")
        #expect(!connection.channel.isActive)
    }

    @Test(arguments: [7, 1000, Int.max])
    func oneHeaderOver8KiBIs431(chunk: Int) async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        try connection.send(
            "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Big: " + String(repeating: "b", count: 9 * 1024) + "\r\n\r\n",
            chunk: chunk)
        let answer = try response(try connection.received())
        #expect(answer.status == 431)
        #expect(answer.body == "request headers over the limit (8 KiB each, 32 KiB in all, 100 fields)\n")
        #expect(!connection.channel.isActive)
    }

    @Test func moreThan100HeaderFieldsIs431() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        let fields = (0..<101).map { "X-F\($0): v\r\n" }.joined()
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n" + fields + "\r\n")
        #expect(try response(try connection.received()).status == 431)
    }

    @Test func headersOver32KiBInAllAre431() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        let fields = (0..<5).map { "X-F\($0): " + String(repeating: "c", count: 7 * 1024) + "\r\n" }.joined()
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n" + fields + "\r\n")
        #expect(try response(try connection.received()).status == 431)
    }

    @Test func headersJustUnderTheLimitsAreServed() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        let fields = (0..<90).map { "X-F\($0): v\r\n" }.joined()
        let big = "X-Big: " + String(repeating: "b", count: 7 * 1024) + "\r\n"
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n" + fields + big + "\r\n")
        #expect(try response(try connection.received()).status == 200)
    }

    @Test func aMalformedRequestIs400() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        try connection.send("GET /healthz HTTP/1.1\r\nHost relay\r\n\r\n")
        let answer = try response(try connection.received())
        #expect(answer.status == 400)
        #expect(answer.body == "malformed HTTP request\n")
        #expect(!connection.channel.isActive)
    }

    @Test func aConnectionOverMaxConnectionsIs503WithRetryAfter() async throws {
        let connection = try HTTPConnection(
            verifier: try await Self.verifier(), settings: HTTPEdgeSettings(maxConnections: 0))
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        let answer = try response(try connection.received())
        #expect(answer.status == 503)
        #expect(answer.headers["retry-after"] == "1")
        #expect(answer.body == "too many connections, retry later\n")
        #expect(!connection.channel.isActive)
    }

    @Test func aRequestNotCompletedInTimeIs408() async throws {
        let connection = try HTTPConnection(
            verifier: try await Self.verifier(), settings: HTTPEdgeSettings(handshakeTimeout: .seconds(2)))
        try connection.send("GET /healthz HTTP/1.1\r\nHo")
        connection.loop.advanceTime(by: .milliseconds(1999))
        #expect(try connection.received() == "")
        connection.loop.advanceTime(by: .milliseconds(1))
        let answer = try response(try connection.received())
        #expect(answer.status == 408)
        #expect(!connection.channel.isActive)
    }

    @Test func aConnectionThatSendsNothingIsClosedWithoutAnswer() async throws {
        let connection = try HTTPConnection(
            verifier: try await Self.verifier(), settings: HTTPEdgeSettings(handshakeTimeout: .seconds(2)))
        connection.loop.advanceTime(by: .seconds(2))
        #expect(try connection.received() == "")
        #expect(!connection.channel.isActive)
    }

    @Test func anIdleKeepAliveConnectionIsClosedWithoutAnswer() async throws {
        let connection = try HTTPConnection(
            verifier: try await Self.verifier(), settings: HTTPEdgeSettings(keepAliveIdle: .seconds(5)))
        try connection.send("GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        _ = try connection.received()
        connection.loop.advanceTime(by: .seconds(4))
        #expect(connection.channel.isActive)
        connection.loop.advanceTime(by: .seconds(1))
        #expect(try connection.received() == "")
        #expect(!connection.channel.isActive)
    }

    @Test(arguments: ["/ws?topic=%zz", "/ws?topic=a%4", "/ws?token=%", "/ws?topic=%C3%28"])
    func aMalformedEscapeInAWebSocketQueryIs400WithAJSONBody(target: String) async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        try connection.send("GET \(target) HTTP/1.1\r\nHost: relay\r\n\r\n")
        let answer = try response(try connection.received())
        #expect(answer.status == 400)
        #expect(answer.headers["content-type"] == "application/json")
        let body = try JSONSerialization.jsonObject(with: Data(answer.body.utf8)) as? [String: String]
        #expect(body == ["error": "bad_request", "message": "malformed percent-escape in the query"])
        #expect(connection.channel.isActive, "a bad request does not end a keep-alive connection")
    }

    @Test func aWellFormedWebSocketQueryWithoutHandshakeIs426() async throws {
        let connection = try HTTPConnection(verifier: try await Self.verifier())
        try connection.send("GET /ws?topic=task%3A1 HTTP/1.1\r\nHost: relay\r\n\r\n")
        #expect(try response(try connection.received()).status == 426)
    }
}
