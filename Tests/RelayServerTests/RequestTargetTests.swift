// RequestTargetTests: an HTTP request target split into its path and decoded query items; a
// malformed escape makes the whole query malformed (the routes answer it with 400).

import Testing

@testable import RelayServer

@Suite struct RequestTargetTests {
    @Test func pathAndItemsInOrder() throws {
        let target = RequestTarget("/ws?topic=task%3A1&topic=task:2&token=a.b.c&flag")
        #expect(target.path == "/ws")
        let query = try #require(target.query)
        #expect(query.map(\.name) == ["topic", "topic", "token", "flag"])
        #expect(target.values("topic") == ["task:1", "task:2"])
        #expect(target.values("token") == ["a.b.c"])
        #expect(target.values("flag") == [""])
        #expect(target.values("missing") == [])
    }

    @Test func aTargetWithoutQueryHasNoItems() {
        #expect(RequestTarget("/healthz").query?.isEmpty == true)
        #expect(RequestTarget("/healthz?").query?.isEmpty == true)
        #expect(RequestTarget("/x?&&").query?.isEmpty == true)
    }

    @Test func onlyTheFirstQuestionMarkAndEqualsSignSplit() {
        let target = RequestTarget("/sse?topic=a=b?c")
        #expect(target.path == "/sse")
        #expect(target.values("topic") == ["a=b?c"])
    }

    @Test func plusIsASpaceAndEscapesDecodeInNamesAndValues() {
        let target = RequestTarget("/ws?to%6Ben=a+b%2Bc")
        #expect(target.values("token") == ["a b+c"])
    }

    @Test(arguments: [
        "/ws?topic=%", "/ws?topic=a%4", "/ws?topic=%zz", "/ws?topic=%FF", "/ws?topic=%C3", "/ws?%zz=x",
        "/sse?topic=ok&since=1%", "/topics/t/events?since=%G0",
    ])
    func aMalformedEscapeAnywhereMakesTheQueryMalformed(uri: String) {
        let target = RequestTarget(uri)
        #expect(target.query == nil)
        #expect(target.values("topic") == [])
        // The path is still known, so that the route can answer 400 itself.
        #expect(target.path == String(uri.prefix { $0 != "?" }))
    }
}
