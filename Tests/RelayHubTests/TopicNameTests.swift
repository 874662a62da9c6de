// Tests of topic names, patterns, grants and grant templates.
//
// Contract 4: `topic` is "1 to 256 bytes of `A-Z a-z 0-9 _ - . : / @ =`".
// Contract 5: "grant `X` covers `X` alone; grant `P*` covers every topic and pattern that starts with `P`".

import Testing

@testable import RelayHub

@Suite("TopicName")
struct TopicNameTests {
    static let allowed = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:/@=".utf8)

    @Test("exactly the contract's characters are topic bytes")
    func topicBytes() {
        for byte in UInt8.min...UInt8.max {
            #expect(TopicName.isTopicByte(byte) == Self.allowed.contains(byte), "byte \(byte)")
        }
        #expect(Self.allowed.count == 69)
    }

    @Test(
        "valid topics",
        arguments: [
            "a", "task:42", "task:", "Z", "0", "user@example.com/jobs=1", "a_b-c.d:e/f@g=h",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:/@=",
            String(repeating: "x", count: 256),
        ])
    func validTopics(_ name: String) {
        #expect(TopicName.isValidTopic(name))
        #expect(TopicName.isValidTopicOrPattern(name))
        #expect(TopicName.patternPrefix(name) == nil)
    }

    @Test(
        "invalid topics",
        arguments: [
            "", " ", "task 42", "task:*", "*", "task\n", "caf\u{E9}", "t\u{0}", "a,b", "a#b", "a?b", "a%20",
            "a+b", "\"a\"", "a\\b", "a{b}", "ta*sk", String(repeating: "x", count: 257),
            // 129 two-byte characters: 129 characters but 258 bytes
            String(repeating: "\u{E9}", count: 129),
        ])
    func invalidTopics(_ name: String) {
        #expect(!TopicName.isValidTopic(name))
    }

    @Test("the 256-byte bound counts bytes")
    func boundCountsBytes() {
        #expect(TopicName.maximumLength == 256)
        #expect(TopicName.isValidTopic(String(repeating: "a", count: 256)))
        #expect(!TopicName.isValidTopic(String(repeating: "a", count: 257)))
        #expect(!TopicName.isValidTopicOrPattern(String(repeating: "a", count: 257)))
    }

    @Test("valid patterns", arguments: ["*", "task:*", "a*", "user:alice:*", "x/y@z=*"])
    func validPatterns(_ name: String) {
        #expect(TopicName.isValidTopicOrPattern(name))
        #expect(!TopicName.isValidTopic(name))
        #expect(TopicName.patternPrefix(name) == name.dropLast())
    }

    @Test(
        "invalid patterns",
        arguments: ["**", "task:**", "ta*sk:*", "*task", "*task*", "task *", "t\u{E9}*", "task:* ", "{sub}*", " *"])
    func invalidPatterns(_ name: String) {
        #expect(!TopicName.isValidTopicOrPattern(name))
    }

    @Test("a pattern is at most 256 bytes with its *")
    func patternLength() {
        #expect(TopicName.isValidTopicOrPattern(String(repeating: "a", count: 255) + "*"))
        #expect(!TopicName.isValidTopicOrPattern(String(repeating: "a", count: 256) + "*"))
    }

    @Test("patternPrefix")
    func patternPrefix() {
        #expect(TopicName.patternPrefix("task:*") == "task:")
        #expect(TopicName.patternPrefix("*") == "")
        #expect(TopicName.patternPrefix("task:1") == nil)
    }
}

@Suite("GrantSet")
struct GrantSetTests {
    @Test("grant X covers X alone")
    func exactGrant() {
        let grants = GrantSet(["task:42"])
        #expect(grants.covers("task:42"))
        for other in ["task:4", "task:421", "task:42:x", "task:42*", "task:*", "task:4*", "*", "TASK:42", "task:43", ""] {
            #expect(!grants.covers(other), "\(other)")
        }
    }

    @Test("grant P* covers every topic and pattern that starts with P")
    func prefixGrant() {
        let grants = GrantSet(["task:*"])
        for covered in ["task:1", "task:", "task:abc/def@x=1", "task:4*", "task:*", "task:42:sub:*", "task::"] {
            #expect(grants.covers(covered), "\(covered)")
        }
        for other in ["task", "tasks:1", "Task:1", "job:1", "*", "t*", "task*", "xtask:1", ""] {
            #expect(!grants.covers(other), "\(other)")
        }
    }

    @Test("grant * covers everything")
    func starGrant() {
        let grants = GrantSet(["*"])
        for name in ["a", "task:1", "task:*", "*", "user:bob:*", String(repeating: "z", count: 256)] {
            #expect(grants.covers(name), "\(name)")
        }
        #expect(grants.prefixes == [""])
    }

    @Test("several grants together")
    func combined() {
        let grants = GrantSet(["task:1", "user:alice:*", "public"])
        #expect(grants.covers("task:1"))
        #expect(grants.covers("user:alice:jobs"))
        #expect(grants.covers("user:alice:*"))
        #expect(grants.covers("public"))
        #expect(!grants.covers("public:1"))
        #expect(!grants.covers("user:bob:jobs"))
        #expect(!grants.covers("user:*"))
        #expect(!grants.covers("task:*"))
        #expect(!grants.isEmpty)
        #expect(grants.exact == ["task:1", "public"])
        #expect(grants.prefixes == ["user:alice:"])
    }

    @Test(
        "malformed grants grant nothing",
        arguments: ["ta*sk", "**", "task:**", "*task", "", " ", "bad topic", "caf\u{E9}", "t\u{E9}*", "{sub}",
            "user:{sub}:*", String(repeating: "x", count: 257)])
    func malformedIgnored(_ grant: String) {
        let grants = GrantSet([grant])
        #expect(grants.isEmpty)
        // In particular `ta*sk` must not act as prefix `ta`, and `*task` must not act as `*`.
        for name in [grant, "ta", "task", "tasker", "x", "*", "task:1", "user:bob:x"] {
            #expect(!grants.covers(name), "grant \(grant) covers \(name)")
        }
    }

    @Test("malformed grants are dropped, well-formed ones kept")
    func mixedGrants() {
        let grants = GrantSet(["ta*sk", "ok", "**", "job:*"])
        #expect(grants.exact == ["ok"])
        #expect(grants.prefixes == ["job:"])
        #expect(grants.covers("ok"))
        #expect(grants.covers("job:7"))
        #expect(!grants.covers("ta"))
        #expect(!grants.covers("task"))
        #expect(GrantSet([String]()).isEmpty)
        #expect(!GrantSet([String]()).covers("a"))
    }
}

@Suite("GrantTemplate")
struct GrantTemplateTests {
    @Test("{sub} is replaced by the token's sub")
    func substitution() throws {
        let template = try #require(GrantTemplate("user:{sub}:*"))
        #expect(template.template == "user:{sub}:*")
        #expect(template.grant(forSubject: "alice") == "user:alice:*")
        #expect(template.grant(forSubject: "alice@example.com") == "user:alice@example.com:*")
        let grants = GrantSet([template.grant(forSubject: "alice")].compactMap { $0 })
        #expect(grants.covers("user:alice:1"))
        #expect(!grants.covers("user:bob:1"))

        #expect(GrantTemplate("{sub}")?.grant(forSubject: "42") == "42")
        #expect(GrantTemplate("a:{sub}:b:{sub}")?.grant(forSubject: "x") == "a:x:b:x")
        #expect(GrantTemplate("{sub}*")?.grant(forSubject: "team7") == "team7*")
    }

    @Test("a template without {sub} is the same grant for everybody")
    func constantTemplate() {
        #expect(GrantTemplate("public:*")?.grant(forSubject: "alice") == "public:*")
        #expect(GrantTemplate("news")?.grant(forSubject: "bob") == "news")
        #expect(GrantTemplate("*")?.grant(forSubject: "bob") == "*")
    }

    @Test(
        "a sub that would widen or break the grant yields nothing",
        arguments: ["*", "a*", "*a", "a*b", "al ice", "caf\u{E9}", "a\nb", "{sub}", "a,b", "a\"b", "a%2A"])
    func badSubjects(_ sub: String) {
        for text in ["user:{sub}:*", "user:{sub}", "{sub}", "{sub}*", "a:{sub}:b:{sub}"] {
            let template = GrantTemplate(text)
            #expect(template != nil)
            #expect(template?.grant(forSubject: sub) == nil, "template \(text), sub \(sub)")
        }
    }

    @Test("a sub that makes the grant longer than 256 bytes yields nothing")
    func tooLongSubject() {
        let template = GrantTemplate("user:{sub}")
        #expect(template?.grant(forSubject: String(repeating: "a", count: 251)) == "user:" + String(repeating: "a", count: 251))
        #expect(template?.grant(forSubject: String(repeating: "a", count: 252)) == nil)
    }

    @Test(
        "malformed templates fail init",
        arguments: ["", "user:{sub", "user:sub}", "user:{subject}", "user:{SUB}", "ta*sk:{sub}", "*{sub}",
            "user {sub}", "{sub}**", "user:{sub}:**", "{}", "user:{sub}:*:x", String(repeating: "x", count: 257)])
    func malformedTemplates(_ text: String) {
        #expect(GrantTemplate(text) == nil)
    }
}
