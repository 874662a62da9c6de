// ClientMessageTests: every op a subscriber may send and every way a message is refused
// (docs/protocol.md section 4: `bad_request` for not JSON, not an object, a missing or malformed
// field; `unknown_op` for an op the relay does not know; unknown fields ignored).

import RelayHub
import Testing

@_spi(Fuzzing) @testable import RelayServer

private func parse(_ text: String) -> Result<ClientMessage, ClientMessage.ParseError> {
    ClientMessage.parse(Array(text.utf8))
}

@Suite struct ClientMessageTests {
    @Test func theTextPingAndThePingOp() {
        #expect(parse("ping") == .success(.ping))
        #expect(parse(#"{"op":"ping"}"#) == .success(.ping))
    }

    @Test func subscribeWithAndWithoutResume() {
        #expect(parse(#"{"op":"subscribe","topic":"task:1"}"#) == .success(.subscribe(topic: "task:1", resume: nil)))
        #expect(
            parse(#"{"op":"subscribe","topic":"task:1","epoch":"e1","since":17}"#)
                == .success(.subscribe(topic: "task:1", resume: ResumePoint(epoch: "e1", since: 17))))
        // A since without its epoch resumes nothing, but is still a resume point (recovered:false).
        #expect(
            parse(#"{"op":"subscribe","topic":"task:1","since":0}"#)
                == .success(.subscribe(topic: "task:1", resume: ResumePoint(epoch: "", since: 0))))
        // An epoch without since asks for no resume.
        #expect(parse(#"{"op":"subscribe","topic":"t","epoch":"e1"}"#) == .success(.subscribe(topic: "t", resume: nil)))
        #expect(
            parse(#"{"op":"subscribe","topic":"t","epoch":"e","since":18446744073709551615}"#)
                == .success(.subscribe(topic: "t", resume: ResumePoint(epoch: "e", since: UInt64.max))))
    }

    @Test func aPatternIsParsedAsAnyTopicIs() {
        // Whether a topic is well-formed or granted is the session's question, not the parser's.
        #expect(parse(#"{"op":"subscribe","topic":"task:*"}"#) == .success(.subscribe(topic: "task:*", resume: nil)))
        #expect(parse(#"{"op":"subscribe","topic":"has space"}"#) == .success(.subscribe(topic: "has space", resume: nil)))
    }

    @Test func unsubscribeAndRefresh() {
        #expect(parse(#"{"op":"unsubscribe","topic":"task:1"}"#) == .success(.unsubscribe(topic: "task:1")))
        #expect(parse(#"{"op":"refresh","token":"a.b.c"}"#) == .success(.refresh(token: "a.b.c")))
    }

    @Test func fieldsBeyondTheOpsAreIgnored() {
        #expect(parse(#"{"op":"ping","id":7,"extra":{"nested":[1,2]}}"#) == .success(.ping))
        #expect(parse(#"{"topic":"t","x":null,"op":"unsubscribe"}"#) == .success(.unsubscribe(topic: "t")))
    }

    @Test(arguments: ["dance", "PING", "Subscribe", "", " ping", "pong", "error"])
    func anUnknownOpIsUnknownOp(op: String) {
        #expect(parse("{\"op\":\"\(op)\"}") == .failure(.unknownOp(op)))
    }

    @Test func anUnknownOpIsReportedEvenWithMissingFields() {
        #expect(parse(#"{"op":"publish","topic":5}"#) == .failure(.badRequest("topic has the wrong type")))
        #expect(parse(#"{"op":"publish"}"#) == .failure(.unknownOp("publish")))
    }

    @Test(arguments: [
        ("not json", "not JSON"), ("", "not JSON"), (" ping", "not JSON"), ("ping\n", "not JSON"), ("{", "not JSON"),
        ("[1,2]", "not a JSON object"), (#""ping""#, "not a JSON object"),
        ("17", "not a JSON object"), ("true", "not a JSON object"), ("{}", "missing op"),
        (#"{"op":5}"#, "op has the wrong type"), (#"{"op":null}"#, "missing op"),
        (#"{"op":"subscribe"}"#, "missing topic"), (#"{"op":"subscribe","topic":null}"#, "missing topic"),
        (#"{"op":"subscribe","topic":["a"]}"#, "topic has the wrong type"),
        (#"{"op":"subscribe","topic":"t","epoch":3,"since":1}"#, "epoch has the wrong type"),
        (#"{"op":"unsubscribe"}"#, "missing topic"), (#"{"op":"refresh"}"#, "missing token"),
        (#"{"op":"refresh","token":42}"#, "token has the wrong type"),
    ])
    func aMalformedMessageIsBadRequest(text: String, message: String) {
        #expect(parse(text) == .failure(.badRequest(message)))
    }

    @Test func aTrailingCommaIsNotJSON() {
        // Foundation's JSONDecoder accepts `{"op":"ping",}` (seen with Swift 6.3.1); the syntax is
        // checked strictly before it decodes (FuzzClientFrame found more it lets through).
        #expect(parse(#"{"op":"ping",}"#) == .failure(.badRequest("not JSON")))
        #expect(parse(#"{"op":"ping","x":"\q"}"#) == .failure(.badRequest("not JSON")))
    }

    @Test(arguments: [
        ("-1", "since must not be negative"), ("0.5", "since must be a whole number"),
        ("18446744073709551616", "since is too large (at most 18446744073709551615)"),
        ("1e30", "since is too large (at most 18446744073709551615)"),
        (#""5""#, "since must be a number"), ("true", "since must be a number"),
        ("[5]", "since must be a whole number from 0 to 18446744073709551615"),
        ("{}", "since must be a whole number from 0 to 18446744073709551615"),
    ])
    func aBadSinceSaysWhy(since: String, message: String) {
        let text = "{\"op\":\"subscribe\",\"topic\":\"t\",\"epoch\":\"e\",\"since\":\(since)}"
        #expect(parse(text) == .failure(.badRequest(message)))
    }

    @Test func invalidUTF8IsNotJSON() {
        // The WebSocket layer closes 1007 before this; the parser must still not accept it.
        let bytes = Array(#"{"op":"subscribe","topic":""#.utf8) + [0xFF] + Array(#""}"#.utf8)
        guard case .failure(.badRequest) = ClientMessage.parse(bytes) else {
            Issue.record("invalid UTF-8 was accepted")
            return
        }
    }
}
