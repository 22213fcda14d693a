using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// The nbd target over TLS (nbds://): against our server with --tls require and against nbdkit
/// (GnuTLS), on TCP and Unix sockets, through its synchronous calls and through the ring backend,
/// whose socket is then one end of a socketpair carried to the TLS session by a <see cref="TlsRelay"/>.
/// </summary>
/// <remarks>Serial: it counts the process's relay threads and allocations.</remarks>
[Collection(nameof(NbdSerialCollection))]
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public sealed unsafe class NbdTargetTlsTests(TlsCertificates certs, PskKeys keys) : IClassFixture<TlsCertificates>, IClassFixture<PskKeys>, IDisposable
{
    private const int Tags = 16;
    private const int TagBytes = 256 * 1024;
    private readonly byte* _buffers = (byte*)NativeMemory.AlignedAlloc(Tags * TagBytes, 4096);

    public void Dispose() => NativeMemory.AlignedFree(_buffers);

    private Span<byte> Span(int tag, int length = TagBytes) => new(_buffers + ((long)tag * TagBytes), length);

    private BackendRequest Request(IoOp op, int tag, long offset, int length = TagBytes) => new(op, IoFlags.None, offset, length, _buffers + ((long)tag * TagBytes));

    private static TestServer Serve(string serverDir, bool tcp, bool verifyPeer = false, NbdTlsMode mode = NbdTlsMode.Require)
        => new(new MemoryTarget(64 << 20), "disk", options: new NbdServerOptions
        {
            Tls = NbdTlsOptions.Load(serverDir, mode, verifyPeer),
        }, tcp: tcp);

    private static string Nbds(TestServer s, string? clientDir)
    {
        var query = clientDir is null ? "" : $"tls-certificates={clientDir}";
        return s.Server.Address.IsUnix
            ? $"nbds+unix:///disk?socket={s.SocketPath}{(query.Length > 0 ? "&" + query : "")}"
            : $"nbds://127.0.0.1:{s.Server.Address.Port}/disk{(query.Length > 0 ? "?" + query : "")}";
    }

    private static string Nbds(Nbdkit k, string clientDir)
        => k.Port > 0 ? $"nbds://localhost:{k.Port}/?tls-certificates={clientDir}" : $"nbds+unix:///?socket={k.SocketPath}&tls-certificates={clientDir}";

    private static Nbdkit StartNbdkit(bool tcp, params string[] args)
    {
        // The nbdkit this runs against must be built with GnuTLS; skip only if it is not.
        var config = Tools.Ok("nbdkit", "--dump-config");
        Assert.SkipUnless(config.Contains("tls=yes", StringComparison.Ordinal), "nbdkit was built without TLS");
        return new Nbdkit(tcp ? FreePort() : 0, args);
    }

    private static int FreePort()
    {
        using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        return ((IPEndPoint)probe.LocalEndPoint!).Port;
    }

    /// <summary>Relay threads end with their connections: none may be left once the test's targets are gone.</summary>
    private static void AssertNoRelayThreads()
    {
        var clock = Stopwatch.StartNew();
        while (TlsRelay.LiveThreads != 0)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"{TlsRelay.LiveThreads} relay threads still running");
            Thread.Sleep(20);
        }
    }

    /// <summary>
    /// Distinct patterns through the ring (every tag in flight at once), read back into other tags'
    /// buffers, then checked against what <paramref name="check"/> reads from the server itself.
    /// </summary>
    private void RingRoundTrip(NbdTarget target, Func<long, int, byte[]> check)
    {
        using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
        Assert.Equal(2, TlsRelay.LiveThreads);
        for (var tag = 0; tag < Tags; tag++)
        {
            new Random(tag).NextBytes(Span(tag));
            Assert.True(ring.Start(tag, Request(IoOp.Write, tag, (long)tag * TagBytes)));
        }
        ring.PumpUntil(() => ring.Results.Count == Tags, TimeSpan.FromSeconds(60), "writes over TLS");
        Assert.All(ring.Results.Values, r => Assert.Equal(TagBytes, r));
        for (var tag = 0; tag < Tags; tag++)
        {
            Span(tag).Clear();
            Assert.True(ring.Start(tag, Request(IoOp.Read, tag, (long)((tag + 5) % Tags) * TagBytes)));
        }
        ring.PumpUntil(() => ring.Results.Count == Tags, TimeSpan.FromSeconds(60), "reads over TLS");
        var expected = new byte[TagBytes];
        for (var tag = 0; tag < Tags; tag++)
        {
            Assert.Equal(TagBytes, ring.Results[tag]);
            new Random((tag + 5) % Tags).NextBytes(expected);
            Assert.True(Span(tag).SequenceEqual(expected), $"tag {tag} read the wrong data over TLS");
            Assert.Equal(expected, check((long)((tag + 5) % Tags) * TagBytes, TagBytes));
        }
        Assert.True(ring.Start(0, new BackendRequest(IoOp.Flush, IoFlags.None, 0, 0, null)));
        ring.PumpUntil(() => ring.Results.ContainsKey(0), TimeSpan.FromSeconds(30), "flush over TLS");
        Assert.Equal(0, ring.Results[0]);
        Assert.Equal(0, target.Reconnects);
        ring.End(TimeSpan.FromSeconds(10));
    }

    /// <summary>The synchronous path (serve -t nbd's pool): SslStream directly, no relay.</summary>
    private static void SyncRoundTrip(NbdTarget target)
    {
        var data = new byte[3 << 20];
        new Random(3).NextBytes(data);
        Assert.Equal(data.Length, target.Write(data, 8 << 20));
        Assert.Equal(0, target.Flush());
        var back = new byte[data.Length];
        Assert.Equal(back.Length, target.Read(back, 8 << 20));
        Assert.Equal(data, back);
        Assert.Equal(0, target.WriteZeroes(8 << 20, 65536, mayUnmap: false));
        Assert.Equal(65536, target.Read(back.AsSpan(0, 65536), 8 << 20));
        Assert.True(back.AsSpan(0, 65536).IndexOfAnyExcept((byte)0) < 0);
        Assert.Equal(0, TlsRelay.LiveThreads);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RoundTripsOverTlsWithOurServer(bool tcp)
    {
        using var s = Serve(certs.Server, tcp);
        using var log = new CapturingLoggerFactory();
        using (var target = new NbdTarget(NbdUri.Parse(Nbds(s, certs.Client)), new NbdTargetOptions { LoggerFactory = log }))
        {
            Assert.Equal(64L << 20, target.Size);
            var line = Assert.Single(log.Messages, m => m.Contains("connected over TLS", StringComparison.Ordinal));
            Assert.Contains("Tls1", line, StringComparison.Ordinal);
            Assert.Contains("TLS_", line, StringComparison.Ordinal);
            SyncRoundTrip(target);
            RingRoundTrip(target, (offset, length) =>
            {
                var back = new byte[length];
                Assert.Equal(length, s.Target.Read(back, offset));
                return back;
            });
        }
        AssertNoRelayThreads();
        Assert.Equal(0, s.Server.TlsFailures);
        // --tls require answered nothing in plain, so everything above went over TLS.
        Assert.Equal(0, s.Server.TlsRequiredRefusals);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RoundTripsOverTlsWithNbdkit(bool tcp)
    {
        using var nbdkit = StartNbdkit(tcp, "--tls=require", $"--tls-certificates={certs.Server}", "memory", "64M");
        var uri = NbdUri.Parse(Nbds(nbdkit, certs.Client));
        using (var target = new NbdTarget(uri))
        using (var reader = new NbdTarget(uri, new NbdTargetOptions { Connections = 1 }))
        {
            SyncRoundTrip(target);
            // What the server holds, through a connection of its own.
            RingRoundTrip(target, (offset, length) =>
            {
                var back = new byte[length];
                Assert.Equal(length, reader.Read(back, offset));
                return back;
            });
        }
        AssertNoRelayThreads();
    }

    /// <summary>
    /// The relay keeps one buffer per direction per connection, so requests through it allocate
    /// nothing of its own once warm: counted over the whole process (the relay's threads, SslStream,
    /// the ring backend), against nbdkit in its own process so no server's allocations count; the
    /// plain path, for comparison, allocates nothing at all.
    /// </summary>
    [Theory]
    [InlineData("x509")]
    [InlineData("psk")]
    [InlineData("plain")]
    public void SteadyStateRequestsThroughTheRelayAllocateNothingOfItsOwn(string mode)
    {
        var tls = mode != "plain";
        using var nbdkit = StartNbdkit(tcp: false, tls ? "--tls=require" : "--tls=off",
            mode == "psk" ? $"--tls-psk={keys.Server}" : $"--tls-certificates={certs.Server}", "memory", "16M");
        var uri = mode switch
        {
            "x509" => Nbds(nbdkit, certs.Client),
            "psk" => $"nbds+unix://alice@/?socket={nbdkit.SocketPath}&tls-psk-file={keys.Server}",
            _ => $"nbd+unix:///?socket={nbdkit.SocketPath}",
        };
        using (var target = new NbdTarget(NbdUri.Parse(uri)))
        using (var ring = new NbdStepRing(target.CreateUringBackend(0)!))
        {
            const int Depth = 8, Length = 65536, WarmUp = 4000, Measured = 8000;
            for (var tag = 0; tag < Depth; tag++)
            {
                Span(tag, Length).Fill((byte)tag);
            }
            void Run(int requests)
            {
                // Every tag in flight; each completion starts the tag's next request (a write, then a read).
                var started = 0;
                for (var tag = 0; tag < Depth; tag++, started++)
                {
                    Assert.True(ring.Start(tag, Request(IoOp.Write, tag, (long)tag * Length, Length)));
                }
                var done = 0;
                while (done < requests)
                {
                    ring.Pump(TimeSpan.FromMilliseconds(100));
                    for (var tag = 0; tag < Depth; tag++)
                    {
                        if (ring.Results.TryGetValue(tag, out var result))
                        {
                            if (result != Length)
                            {
                                Assert.Fail($"tag {tag}: {result}");
                            }
                            done++;
                            ring.Results.Remove(tag);
                            if (started < requests)
                            {
                                started++;
                                ring.Start(tag, Request((started & 1) == 0 ? IoOp.Write : IoOp.Read, tag, (long)tag * Length, Length));
                            }
                        }
                    }
                }
            }
            Run(WarmUp);
            var before = GC.GetTotalAllocatedBytes(precise: true);
            var queue = GC.GetAllocatedBytesForCurrentThread();
            Run(Measured);
            var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
            queue = GC.GetAllocatedBytesForCurrentThread() - queue;
            // The queue's side (this thread: the ring backend) allocates nothing per request, nor
            // does the relay's own code; SslStream's Read and Write allocate a little now and then
            // (on .NET 10 some 25-50 bytes a 64 KiB request on average), as do the
            // runner and timers meanwhile. A buffer per request would be 64 KiB.
            var message = $"{allocated} bytes allocated for {Measured} requests ({allocated / (double)Measured:F1} per request; {queue} on the queue's thread)";
            TestContext.Current.SendDiagnosticMessage($"{mode}: {message}");
            Assert.True(queue / Measured < 16, message);
            // GnuTLS (psk) works in native memory: like plain, nothing managed per request.
            Assert.True(allocated / Measured < (mode == "x509" ? 128 : 16), message);
            Assert.Equal(0, target.Reconnects);
            ring.End(TimeSpan.FromSeconds(10));
        }
        AssertNoRelayThreads();
    }

    private TestServer ServePsk(bool tcp) => new(new MemoryTarget(64 << 20), "disk", options: new NbdServerOptions
    {
        Tls = NbdTlsOptions.LoadPsk(keys.Server, NbdTlsMode.Require),
    }, tcp: tcp);

    private static string NbdsPsk(TestServer s, string user, string keyFile)
        => s.Server.Address.IsUnix
            ? $"nbds+unix://{user}@/disk?socket={s.SocketPath}&tls-psk-file={keyFile}"
            : $"nbds://{user}@127.0.0.1:{s.Server.Address.Port}/disk?tls-psk-file={keyFile}";

    /// <summary>TLS-PSK (GnuTLS, as SslStream has none) through the same relay: our server, TCP and Unix.</summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RoundTripsOverPskWithOurServer(bool tcp)
    {
        using var s = ServePsk(tcp);
        using var log = new CapturingLoggerFactory();
        using (var target = new NbdTarget(NbdUri.Parse(NbdsPsk(s, "alice", keys.Server)), new NbdTargetOptions { LoggerFactory = log }))
        {
            Assert.Equal(64L << 20, target.Size);
            var line = Assert.Single(log.Messages, m => m.Contains("connected over TLS", StringComparison.Ordinal));
            Assert.Contains("PSK", line, StringComparison.Ordinal);
            SyncRoundTrip(target);
            RingRoundTrip(target, (offset, length) =>
            {
                var back = new byte[length];
                Assert.Equal(length, s.Target.Read(back, offset));
                return back;
            });
        }
        AssertNoRelayThreads();
        Assert.Equal(0, s.Server.TlsFailures);
        Assert.Equal(0, s.Server.TlsRequiredRefusals);
    }

    [Fact]
    public void RoundTripsOverPskWithNbdkit()
    {
        using var nbdkit = StartNbdkit(tcp: true, "--tls=require", $"--tls-psk={keys.Server}", "memory", "64M");
        // The identity through --tls-psk's recipe keys, as `add` passes them, and through the URI.
        using (var target = (NbdTarget)TargetFactory.Create("nbd", new Dictionary<string, string>
        {
            ["uri"] = $"nbds://localhost:{nbdkit.Port}/",
            ["tls-psk"] = keys.Server,
            ["tls-username"] = "alice",
        }))
        using (var reader = new NbdTarget(NbdUri.Parse($"nbds://alice@localhost:{nbdkit.Port}/?tls-psk-file={keys.Server}"), new NbdTargetOptions { Connections = 1 }))
        {
            // The recipe keeps the key file's path and the user, never the key.
            Assert.Equal(keys.Server, target.Recipe["tls-psk"]);
            Assert.Equal("alice", target.Recipe["tls-username"]);
            var key = File.ReadAllText(keys.Server).Trim().Split(':')[1];
            Assert.DoesNotContain(target.Recipe.Values, v => v.Contains(key, StringComparison.OrdinalIgnoreCase));
            SyncRoundTrip(target);
            RingRoundTrip(target, (offset, length) =>
            {
                var back = new byte[length];
                Assert.Equal(length, reader.Read(back, offset));
                return back;
            });
        }
        AssertNoRelayThreads();
    }

    [Fact]
    public void AWrongKeyOrAnUnknownUserIsRefusedAndTheServerServesOn()
    {
        using var s = ServePsk(tcp: true);
        var wrong = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(NbdsPsk(s, "alice", keys.File("wrong")))));
        Assert.Contains("the TLS-PSK handshake as 'alice' failed", wrong.Message, StringComparison.Ordinal);
        Assert.StartsWith("nbds://alice@127.0.0.1:", wrong.Message, StringComparison.Ordinal);
        // bob holds a key, but not one the server knows.
        var bob = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(NbdsPsk(s, "bob", keys.File("bob")))));
        Assert.Contains("the TLS-PSK handshake as 'bob' failed", bob.Message, StringComparison.Ordinal);
        // A key file without the user's line is refused before any connection.
        var none = Assert.Throws<ArgumentException>(() => new NbdTarget(NbdUri.Parse(NbdsPsk(s, "alice", keys.File("bob")))));
        Assert.Contains("holds no key for the user 'alice'", none.Message, StringComparison.Ordinal);
        // An x509 client to a PSK server, and a PSK client to an x509 server: refused, never plain.
        Assert.ThrowsAny<IOException>(() => new NbdTarget(NbdUri.Parse($"nbds://127.0.0.1:{s.Server.Address.Port}/disk?tls-certificates={certs.Client}")));
        using (var x509 = Serve(certs.Server, tcp: true))
        {
            Assert.ThrowsAny<IOException>(() => new NbdTarget(NbdUri.Parse(NbdsPsk(x509, "alice", keys.Server))));
            Assert.Equal(0, x509.Server.RequestsServed);
        }
        Assert.Equal(0, s.Server.RequestsServed);
        using var good = new NbdTarget(NbdUri.Parse(NbdsPsk(s, "alice", keys.Server)));
        Assert.Equal(64L << 20, good.Size);
        var (code, _, stderr) = NbdCliTests.Cli($"add -t nbd --uri nbds://alice@127.0.0.1:{s.Server.Address.Port}/disk --tls-psk {keys.File("wrong")}");
        Assert.NotEqual(0, code);
        var line = Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains("the TLS-PSK handshake as 'alice' failed", line, StringComparison.Ordinal);
        AssertNoRelayThreads();
    }

    [Fact]
    public void ServersThatVerifyPeersTakeOurClientCertificateAndRefuseUsWithoutOne()
    {
        var caOnly = CaOnly();
        using var s = Serve(certs.Server, tcp: true, verifyPeer: true);
        using (var target = new NbdTarget(NbdUri.Parse(Nbds(s, certs.Client))))
        {
            SyncRoundTrip(target);
        }
        var e = Assert.ThrowsAny<IOException>(() => new NbdTarget(NbdUri.Parse(Nbds(s, caOnly))));
        Assert.Contains("client certificate", e.Message, StringComparison.Ordinal);

        using var nbdkit = StartNbdkit(tcp: false, "--tls=require", "--tls-verify-peer", $"--tls-certificates={certs.Server}", "memory", "16M");
        using (var target = new NbdTarget(NbdUri.Parse(Nbds(nbdkit, certs.Client))))
        {
            SyncRoundTrip(target);
        }
        var k = Assert.ThrowsAny<IOException>(() => new NbdTarget(NbdUri.Parse(Nbds(nbdkit, caOnly))));
        Assert.Contains("client certificate", k.Message, StringComparison.Ordinal);
        AssertNoRelayThreads();
    }

    /// <summary>A client directory with ca-cert.pem alone.</summary>
    private string CaOnly()
    {
        var dir = Path.Combine(certs.Root, "ca-only");
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(certs.Client, "ca-cert.pem"), Path.Combine(dir, "ca-cert.pem"), overwrite: true);
        return dir;
    }

    [Fact]
    public void AServerWithACertificateFromAnotherCaOrForAnotherNameIsRefused()
    {
        using var s = Serve(certs.Server, tcp: true);
        // certs.OtherCaClient trusts another CA than the one that issued the server's certificate.
        var e = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(Nbds(s, certs.OtherCaClient))));
        Assert.Contains("the server's certificate 'CN=localhost' is refused", e.Message, StringComparison.Ordinal);
        Assert.Contains("it is not vouched for by the CA in ca-cert.pem (PartialChain", e.Message, StringComparison.Ordinal);

        // Its certificate is for localhost and 127.0.0.1, not for another name.
        var name = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse($"{Nbds(s, certs.Client)}&tls-hostname=disk.example.org")));
        Assert.Contains("it is not for 'disk.example.org'", name.Message, StringComparison.Ordinal);
        // And by its name it is fine.
        using var byName = new NbdTarget(NbdUri.Parse($"nbds://localhost:{s.Server.Address.Port}/disk?tls-certificates={certs.Client}"));
        Assert.Equal(64L << 20, byName.Size);

        using var nbdkit = StartNbdkit(tcp: true, "--tls=require", $"--tls-certificates={certs.Server}", "memory", "16M");
        var k = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(Nbds(nbdkit, certs.OtherCaClient))));
        Assert.Contains("it is not vouched for by the CA in ca-cert.pem", k.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AServerThatDoesNotOfferTlsIsRefusedNeverUsedInPlain()
    {
        using var plain = new TestServer(new MemoryTarget(1 << 20), "disk", tcp: true);
        var e = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(Nbds(plain, certs.Client))));
        Assert.Contains("the server does not offer TLS (it answered NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP", e.Message, StringComparison.Ordinal);
        Assert.Equal(0, plain.Server.RequestsServed);

        using var nbdkit = StartNbdkit(tcp: false, "memory", "1M");
        var k = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse(Nbds(nbdkit, certs.Client))));
        Assert.Contains("the server does not offer TLS", k.Message, StringComparison.Ordinal);

        // And the other way round: a plain URI to a server that requires TLS says what to do.
        using var tls = Serve(certs.Server, tcp: false);
        var r = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Parse($"nbd+unix:///disk?socket={tls.SocketPath}")));
        Assert.Contains("the server requires TLS: use an nbds:// URI", r.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TheCommandLineSaysInOneLineWhyTlsFailed()
    {
        using var tls = Serve(certs.Server, tcp: true);
        using var plain = new TestServer(new MemoryTarget(1 << 20), "disk", tcp: true);
        var tlsUri = $"nbds://127.0.0.1:{tls.Server.Address.Port}/disk";
        (string Args, string Message)[] cases =
        [
            ($"add -t nbd --uri {tlsUri} --tls-certificates {certs.OtherCaClient}", "it is not vouched for by the CA in ca-cert.pem"),
            ($"add -t nbd --uri {tlsUri}?tls-certificates={certs.OtherCaClient}", "the server's certificate 'CN=localhost' is refused"),
            ($"add -t nbd --uri {tls.Uri}", "the server requires TLS: use an nbds:// URI"),
            ($"add -t nbd --uri nbds://127.0.0.1:{plain.Server.Address.Port}/disk --tls-certificates {certs.Client}", "the server does not offer TLS"),
            ($"add -t nbd --uri {tlsUri}?tls-psk-file=/nonexistent/keys.psk", "cannot read the PSK file /nonexistent/keys.psk"),
            ($"serve -t nbd --uri {tlsUri}?tls-certificates={certs.OtherCaClient} --listen tcp://127.0.0.1:0", "is refused"),
        ];
        foreach (var (args, message) in cases)
        {
            var (code, _, stderr) = NbdCliTests.Cli(args);
            Assert.NotEqual(0, code);
            var line = Assert.Single(stderr.Trim().Split('\n'));
            Assert.Contains(message, line, StringComparison.Ordinal);
            Assert.Contains(args.Split(' ')[4].Split('?')[0], line, StringComparison.Ordinal);
        }
        Assert.Equal(0, plain.Server.RequestsServed);
    }

    [Fact]
    public void CertificatesWithoutACaOrForAPlainUriAreRefused()
    {
        using var s = Serve(certs.Server, tcp: true);
        var noCa = Path.Combine(certs.Root, "no-ca");
        Directory.CreateDirectory(noCa);
        File.Copy(Path.Combine(certs.Client, "client-cert.pem"), Path.Combine(noCa, "client-cert.pem"), overwrite: true);
        File.Copy(Path.Combine(certs.Client, "client-key.pem"), Path.Combine(noCa, "client-key.pem"), overwrite: true);
        var e = Assert.Throws<ArgumentException>(() => new NbdTarget(NbdUri.Parse(Nbds(s, noCa))));
        Assert.Contains($"{noCa}/ca-cert.pem is missing", e.Message, StringComparison.Ordinal);
        var none = Assert.Throws<ArgumentException>(() => new NbdTarget(NbdUri.Parse(Nbds(s, null))));
        Assert.Contains("TLS needs a directory with ca-cert.pem", none.Message, StringComparison.Ordinal);
        var plain = Assert.Throws<ArgumentException>(() => new NbdTarget(NbdUri.Parse(s.Uri), new NbdTargetOptions { Tls = NbdClientTlsOptions.Load(certs.Client) }));
        Assert.Contains("use nbds://", plain.Message, StringComparison.Ordinal);
        Assert.Equal(0, s.Server.ConnectionsAccepted);
    }

    [Fact]
    public void TheRecipeKeepsTheCertificatesSoARestartConnectsAgain()
    {
        using var s = Serve(certs.Server, tcp: true);
        var uri = $"nbds://127.0.0.1:{s.Server.Address.Port}/disk";
        using var target = (NbdTarget)TargetFactory.Create("nbd", new Dictionary<string, string> { ["uri"] = uri, ["tls-certificates"] = certs.Client });
        Assert.Equal(uri, target.Recipe["uri"]);
        Assert.Equal(certs.Client, target.Recipe["tls-certificates"]);
        using var again = (NbdTarget)TargetFactory.Create("nbd", target.Recipe);
        SyncRoundTrip(again);
        var plain = Assert.Throws<ArgumentException>(() => TargetFactory.Create("nbd", new Dictionary<string, string> { ["uri"] = s.Uri, ["tls-certificates"] = certs.Client }));
        Assert.Contains("--tls-certificates is for TLS", plain.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AConnectionClosedUnderIoIsMadeAgainOverTlsAndItsRequestsAreSentAgain()
    {
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, "disk", ownsTarget: false, options: new NbdServerOptions { Tls = NbdTlsOptions.Load(certs.Server, NbdTlsMode.Require, false) });
        var proxyPath = Path.Combine(server.Directory, "proxy.sock");
        using var proxy = SilentProxy.ToUnix(server.SocketPath, proxyPath);
        using (var target = new NbdTarget(NbdUri.Parse($"nbds+unix:///disk?socket={proxyPath}&tls-certificates={certs.Client}")))
        using (var ring = new NbdStepRing(target.CreateUringBackend(0)!))
        {
            Span(0, 4096).Fill(0x11);
            Assert.True(ring.Start(0, Request(IoOp.Write, 0, 0, 4096)));
            ring.PumpUntil(() => ring.Results.Count == 1, TimeSpan.FromSeconds(30), "first write");
            Assert.Equal(4096, ring.Results[0]);
            // The proxy holds the requests, then closes every connection under them (the server's
            // side of the TLS session dies): they must go again, on a new TLS connection.
            proxy.Forwarding = false;
            for (var tag = 0; tag < 4; tag++)
            {
                Assert.True(ring.Start(tag, Request(IoOp.Read, tag, 0, 4096)));
            }
            ring.Pump(TimeSpan.FromMilliseconds(200));
            Assert.Empty(ring.Results);
            proxy.Forwarding = true;
            proxy.CloseAll();
            ring.PumpUntil(() => ring.Results.Count == 4, TimeSpan.FromSeconds(30), "reads sent again");
            Assert.All(ring.Results.Values, r => Assert.Equal(4096, r));
            Assert.True(Span(3, 4096).IndexOfAnyExcept((byte)0x11) < 0);
            Assert.Equal(1, target.Reconnects);
            Assert.Equal(2, proxy.Accepted);
            // The dropped connection's relay has ended; the new one's two threads run.
            var clock = Stopwatch.StartNew();
            while (TlsRelay.LiveThreads != 2)
            {
                Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"{TlsRelay.LiveThreads} relay threads, not 2");
                Thread.Sleep(20);
            }
            ring.End(TimeSpan.FromSeconds(10));
        }
        AssertNoRelayThreads();
        Assert.Equal(0, server.Server.TlsFailures);
    }

    [Fact]
    public void AServerKilledUnderIoFailsTheRequestsAsOverPlainAndTheQueueEnds()
    {
        var nbdkit = StartNbdkit(tcp: true, "--tls=require", $"--tls-certificates={certs.Server}", "memory", "16M");
        try
        {
            using var target = new NbdTarget(NbdUri.Parse(Nbds(nbdkit, certs.Client)), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(2) });
            using var ring = new NbdStepRing(target.CreateUringBackend(0)!);
            Span(0, 4096).Fill(0x22);
            Assert.True(ring.Start(0, Request(IoOp.Write, 0, 0, 4096)));
            ring.PumpUntil(() => ring.Results.Count == 1, TimeSpan.FromSeconds(30), "first write");
            Assert.Equal(4096, ring.Results[0]);
            ring.Results.Clear();
            nbdkit.Kill();
            var clock = Stopwatch.StartNew();
            for (var tag = 0; tag < 4; tag++)
            {
                Assert.True(ring.Start(tag, Request(IoOp.Read, tag, 0, 4096)));
            }
            ring.PumpUntil(() => ring.Results.Count == 4, TimeSpan.FromSeconds(30), "reads with the server gone");
            Assert.All(ring.Results.Values, r => Assert.Equal(-Errno.EIO, r));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30));
            Assert.True(target.Reconnects >= 1);
            ring.End(TimeSpan.FromSeconds(10));
        }
        finally
        {
            nbdkit.Dispose();
        }
        AssertNoRelayThreads();
    }
}
