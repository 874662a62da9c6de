// Tests of `--publish-grant WHO=PATTERN`: parsing WHO and PATTERN, resolving names, the
// `{uid}` and `{user}` templates, and which rules apply to a connection's credentials.

import Testing

@testable import RelayHub

@Suite("PublishGrants")
struct PublishGrantTests {
    static let users: [String: UInt32] = ["alice": 1000, "daemon": 1]
    static let groups: [String: UInt32] = ["celery": 2000, "root": 0]

    static func rule(_ text: String) throws -> PublishGrantRule {
        try PublishGrantSpec(parsing: text).resolved(uidOfUser: { users[$0] }, gidOfGroup: { groups[$0] })
    }

    static func grants(_ rules: [String], uid: UInt32, gid: UInt32, groups: [UInt32]? = [], user: String? = nil) throws -> GrantSet {
        PublishPolicy(rules: try rules.map(rule))
            .grants(for: PublisherIdentity(uid: uid, gid: gid, groups: groups, userName: user))
    }

    @Test("WHO forms")
    func whoForms() throws {
        #expect(try PublishGrantSpec(parsing: "uid:1234=app1:*").who == .uid(1234))
        #expect(try PublishGrantSpec(parsing: "gid:0=x").who == .gid(0))
        #expect(try PublishGrantSpec(parsing: "user:alice=x").who == .user("alice"))
        #expect(try PublishGrantSpec(parsing: "group:celery=task:*").who == .group("celery"))
        #expect(try PublishGrantSpec(parsing: "*=user:{user}:*").who == .anyone)
        // A topic may hold `=`: only the first one ends WHO.
        let spec = try PublishGrantSpec(parsing: "uid:1=a=b")
        #expect(spec.pattern == "a=b")
    }

    @Test(
        "malformed grants are refused",
        arguments: [
            "", "app1:*", "uid:=x", "uid:abc=x", "uid:-1=x", "uid:4294967295=x", "uid:4294967296=x", "uid: 1=x",
            "user:=x", "group:=x", "name:alice=x", "uid:1=", "uid:1=a*b", "uid:1=a b", "uid:1={sub}:*",
            "uid:1={uid", "*=**",
        ])
    func malformed(_ text: String) {
        #expect(throws: PublishGrantError.self) { try PublishGrantSpec(parsing: text) }
    }

    @Test("names resolve through the lookups; an unknown name is an error")
    func names() throws {
        #expect(try Self.rule("user:alice=x").subject == .uid(1000))
        #expect(try Self.rule("group:celery=x").subject == .gid(2000))
        #expect(throws: PublishGrantError.unknownName("no user named \"nosuchuser\"")) { try Self.rule("user:nosuchuser=x") }
        #expect(throws: PublishGrantError.unknownName("no group named \"nogroup\"")) { try Self.rule("group:nogroup=x") }
    }

    @Test("a uid rule applies to that uid only")
    func uidRule() throws {
        let granted = try Self.grants(["uid:1234=app1:*"], uid: 1234, gid: 1234)
        #expect(granted.covers("app1:x"))
        #expect(!granted.covers("app2:x"))
        #expect(try Self.grants(["uid:1234=app1:*"], uid: 1235, gid: 1234).isEmpty)
    }

    @Test("a group rule applies to the primary and to supplementary gids")
    func groupRule() throws {
        let rules = ["group:celery=task:*"]
        #expect(try Self.grants(rules, uid: 5, gid: 2000).covers("task:1"))
        #expect(try Self.grants(rules, uid: 5, gid: 5, groups: [7, 2000]).covers("task:1"))
        #expect(try Self.grants(rules, uid: 5, gid: 5, groups: [7]).isEmpty)
        // Unreadable supplementary groups: no group rule applies, not even the primary gid's.
        #expect(try Self.grants(rules, uid: 5, gid: 2000, groups: nil).isEmpty)
        // gid 0 matches as a primary or a listed group, never by default.
        #expect(try Self.grants(["gid:0=root:*"], uid: 5, gid: 5, groups: []).isEmpty)
        #expect(try Self.grants(["gid:0=root:*"], uid: 5, gid: 5, groups: [0]).covers("root:x"))
    }

    @Test("templates: {uid} and {user}")
    func templates() throws {
        let rules = ["*=user:{user}:*", "*=uid:{uid}"]
        let daemon = try Self.grants(rules, uid: 1, gid: 1, user: "daemon")
        #expect(daemon.covers("user:daemon:jobs"))
        #expect(daemon.covers("uid:1"))
        #expect(!daemon.covers("uid:10"))
        #expect(!daemon.covers("user:alice:jobs"))
        // No passwd entry: {user} grants nothing; {uid} still does.
        let nameless = try Self.grants(rules, uid: 61000, gid: 61000, user: nil)
        #expect(!nameless.covers("user::x"))
        #expect(nameless.exact == ["uid:61000"])
        #expect(nameless.prefixes.isEmpty)
        // A name that is not topic text must never widen or break a grant.
        #expect(try Self.grants(rules, uid: 7, gid: 7, user: "a*").prefixes.isEmpty)
        #expect(try Self.grants(rules, uid: 7, gid: 7, user: "ad$").prefixes.isEmpty)
    }

    @Test("rules add up, and only what applies")
    func combined() throws {
        let rules = ["uid:1000=app1:*", "group:celery=task:*", "user:daemon=daemon:status"]
        let alice = try Self.grants(rules, uid: 1000, gid: 1000, groups: [2000])
        #expect(alice.covers("app1:a") && alice.covers("task:9") && !alice.covers("daemon:status"))
        let daemon = try Self.grants(rules, uid: 1, gid: 1)
        #expect(daemon.covers("daemon:status") && !daemon.covers("daemon:status2") && !daemon.covers("task:9"))
        #expect(PublishPolicy(rules: try rules.map(Self.rule)).needsGroups)
        #expect(!PublishPolicy(rules: try rules.map(Self.rule)).needsUserName)
        #expect(PublishPolicy(rules: [try Self.rule("*=user:{user}:*")]).needsUserName)
    }
}
