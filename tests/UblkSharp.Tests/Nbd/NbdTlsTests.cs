using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using System.Text.Json;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// NBD over TLS (NBD_OPT_STARTTLS) against clients that use GnuTLS (libnbd's tools, nbdsh, qemu),
/// a hand-driven client for what the protocol demands exactly, and clients that misbehave.
/// </summary>
public class NbdTlsTests(TlsCertificates certs, ITestOutputHelper output) : IClassFixture<TlsCertificates>
{
    private TestServer Serve(NbdTlsMode mode, string? directory = null, bool verifyPeer = false, CapturingLoggerFactory? log = null,
        TimeSpan? handshakeTimeout = null, string export = "disk", long size = 16 << 20)
        => new(new MemoryTarget(size), export, options: new NbdServerOptions
        {
            Tls = NbdTlsOptions.Load(directory ?? certs.Server, mode, verifyPeer),
            LoggerFactory = log ?? new CapturingLoggerFactory(),
            HandshakeTimeout = handshakeTimeout ?? TimeSpan.FromSeconds(10),
        }, tcp: true);

    private static string Nbds(TestServer s, string clientDir, int? port = null)
        => $"nbds://127.0.0.1:{port ?? s.Server.Address.Port}/{s.Export.Name}?tls-certificates={clientDir}";

    private static string[] QemuTls(string clientDir) => ["--object", $"tls-creds-x509,id=tls0,dir={clientDir},endpoint=client"];

    private static string QemuImage(TestServer s) => $"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={s.Server.Address.Port},export={s.Export.Name},tls-creds=tls0";

    [Fact]
    public void NbdshWritesAndReadsBackOverTls()
    {
        using var s = Serve(NbdTlsMode.Require);
        var printed = Nbdsh(Nbds(s, certs.Client), """
            data = bytes(range(256)) * 256
            h.pwrite(data, 1 << 20)
            h.flush()
            assert h.pread(len(data), 1 << 20) == data
            print('TLS', h.get_tls_negotiated())
            """);
        Assert.Contains("TLS True", printed, StringComparison.Ordinal);
        // Through the server's target: what the client wrote is there.
        var back = new byte[65536];
        Assert.Equal(back.Length, s.Target.Read(back, 1 << 20));
        Assert.Equal(Enumerable.Range(0, 65536).Select(i => (byte)i), back);
        Assert.Equal(0, s.Server.TlsFailures);
    }

    [Fact]
    public void NbdinfoAndNbdcopyOverTls()
    {
        using var s = Serve(NbdTlsMode.Require);
        var pattern = new byte[4 << 20];
        new Random(16).NextBytes(pattern);
        Assert.Equal(pattern.Length, s.Target.Write(pattern, 0));
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", Nbds(s, certs.Client)));
        Assert.Equal(16L << 20, json.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64());
        Assert.Equal("disk", json.RootElement.GetProperty("exports")[0].GetProperty("export-name").GetString());
        var copy = s.TempPath("copy.raw");
        Tools.Ok("nbdcopy", Nbds(s, certs.Client), copy);
        Assert.Equal(pattern, File.ReadAllBytes(copy).AsSpan(0, pattern.Length).ToArray());
    }

    [Fact]
    public void QemuImgConvertAndQemuIoOverTls()
    {
        using var s = Serve(NbdTlsMode.Require);
        var source = s.TempPath("source.raw");
        var bytes = new byte[16 << 20];
        new Random(7).NextBytes(bytes.AsSpan(0, 8 << 20));
        File.WriteAllBytes(source, bytes);
        // Into the export, then out again: byte-identical both ways.
        Tools.Ok("qemu-img", ["convert", .. QemuTls(certs.Client), "-n", "-f", "raw", source, "--target-image-opts", QemuImage(s)]);
        var back = s.TempPath("back.raw");
        Tools.Ok("qemu-img", ["convert", .. QemuTls(certs.Client), "--image-opts", QemuImage(s), "-O", "raw", back]);
        Assert.True(bytes.AsSpan().SequenceEqual(File.ReadAllBytes(back)), "qemu-img convert over TLS changed the data");
        var io = Tools.Ok("qemu-io", [.. QemuTls(certs.Client), "--image-opts", QemuImage(s), "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"]);
        Assert.DoesNotContain("fail", io, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("mismatch", io, StringComparison.OrdinalIgnoreCase);
        var check = new byte[65536];
        s.Target.Read(check, 1 << 20);
        Assert.True(check.AsSpan().IndexOfAnyExcept((byte)0x5a) < 0, "qemu-io's write did not reach the target");
    }

    [Fact]
    public void VerifyPeerServesCertifiedClientsAndRefusesTheRest()
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(NbdTlsMode.Require, verifyPeer: true, log: log);
        Assert.Contains("OK", Nbdsh(Nbds(s, certs.Client), "h.pwrite(b'v' * 512, 0)\nprint('OK')"), StringComparison.Ordinal);
        Tools.Ok("qemu-img", ["info", .. QemuTls(certs.Client), "--image-opts", QemuImage(s)]);
        // No client certificate (a directory with the CA alone), one from another CA, an expired
        // one: each against a server of its own, since the log says one failure per 10 s. GnuTLS
        // holds back a certificate whose issuer is not among the CAs the server names, so the one
        // from another CA never arrives; the expired one does, and its chain is refused.
        var caOnly = Path.Combine(certs.Root, "ca-only");
        Directory.CreateDirectory(caOnly);
        File.Copy(Path.Combine(certs.Client, "ca-cert.pem"), Path.Combine(caOnly, "ca-cert.pem"), overwrite: true);
        foreach (var (dir, why) in new[] { (caOnly, "the client sent no certificate"), (certs.ForeignClient, "the client sent no certificate"), (certs.ExpiredClient, "NotTimeValid") })
        {
            var own = new CapturingLoggerFactory();
            using var t = Serve(NbdTlsMode.Require, verifyPeer: true, log: own);
            var (code, _, stderr) = Tools.Run("nbdinfo", [Nbds(t, dir)], TimeSpan.FromSeconds(30));
            output.WriteLine($"{Path.GetFileName(dir)}: nbdinfo exited {code}: {stderr.Trim()}");
            Assert.NotEqual(0, code);
            // The server counts the failure as the client leaves; give it a moment.
            WaitFor(() => t.Server.TlsFailures == 1);
            Assert.Equal(1, t.Server.TlsFailures);
            var line = Assert.Single(own.Messages, m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal));
            output.WriteLine(line);
            Assert.Contains(why, line, StringComparison.Ordinal);
        }
        var (refused, _, _) = Tools.Run("nbdinfo", [Nbds(s, certs.ExpiredClient)], TimeSpan.FromSeconds(30));
        Assert.NotEqual(0, refused);
        WaitFor(() => s.Server.TlsFailures == 1);
        Assert.Contains(log.Messages, m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal));
        Assert.Equal(0, s.Server.InternalErrors);
        Assert.Contains("OK", Nbdsh(Nbds(s, certs.Client), "assert h.pread(512, 0) == b'v' * 512\nprint('OK')"), StringComparison.Ordinal);
    }

    /// <summary>A client certificate from another CA that does arrive (a .NET client sends it anyway) fails the chain check.</summary>
    [Fact]
    public void VerifyPeerRefusesACertificateFromAnotherCa()
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(NbdTlsMode.Require, verifyPeer: true, log: log);
        foreach (var (dir, ok) in new[] { (certs.Client, true), (certs.ForeignClient, false) })
        {
            using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
            c.ReadGreeting();
            c.SendClientFlags();
            c.SendOption(OptStartTls, []);
            Assert.Equal(RepAck, c.ReadOptionReply().Type);
            var served = false;
            try
            {
                using var tls = ClientTls(c.Socket, dir);
                // With TLS 1.3 the client may finish before the server has judged its certificate:
                // the first exchange tells.
                SendOption(tls, OptList, []);
                served = ReadOptionReply(tls).Type == RepServer;
            }
            catch (Exception e) when (e is IOException or System.Security.Authentication.AuthenticationException)
            {
                output.WriteLine($"{Path.GetFileName(dir)}: {e.Message}");
            }
            Assert.Equal(ok, served);
        }
        WaitFor(() => s.Server.TlsFailures == 1);
        Assert.Equal(1, s.Server.TlsFailures);
        var line = Assert.Single(log.Messages, m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal));
        output.WriteLine(line);
        Assert.Contains("client certificate 'CN=client' refused: ", line, StringComparison.Ordinal);
    }

    [Fact]
    public void AClientThatTrustsAnotherCaOrSeesAnExpiredCertificateRefusesTheServer()
    {
        var log = new CapturingLoggerFactory();
        using (var s = Serve(NbdTlsMode.Require, log: log))
        {
            var (code, _, stderr) = Tools.Run("nbdinfo", [Nbds(s, certs.OtherCaClient)], TimeSpan.FromSeconds(30));
            output.WriteLine($"other CA: {code}: {stderr.Trim()}");
            Assert.NotEqual(0, code);
            var (qcode, _, qerr) = Tools.Run("qemu-img", ["info", .. QemuTls(certs.OtherCaClient), "--image-opts", QemuImage(s)], TimeSpan.FromSeconds(30));
            output.WriteLine($"other CA, qemu-img: {qcode}: {qerr.Trim()}");
            Assert.NotEqual(0, qcode);
            WaitFor(() => s.Server.TlsFailures >= 2);
            Assert.Contains("OK", Nbdsh(Nbds(s, certs.Client), "print('OK')"), StringComparison.Ordinal);
        }
        // NbdTlsOptions.Load refuses an expired certificate, so build the options by hand.
        using var pem = X509Certificate2.CreateFromPemFile(Path.Combine(certs.ExpiredServer, "server-cert.pem"), Path.Combine(certs.ExpiredServer, "server-key.pem"));
        using var expired = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
        using var e = new TestServer(new MemoryTarget(1 << 20), "disk", options: new NbdServerOptions
        {
            Tls = new NbdTlsOptions { Mode = NbdTlsMode.Require, Certificate = expired },
            LoggerFactory = log,
        }, tcp: true);
        var (ecode, _, eerr) = Tools.Run("nbdinfo", [Nbds(e, certs.Client)], TimeSpan.FromSeconds(30));
        output.WriteLine($"expired: {ecode}: {eerr.Trim()}");
        Assert.NotEqual(0, ecode);
        // The certificate differs from the one the other tests use only in its dates (same CA, same
        // names), so its expiry is what the clients refuse. qemu calls that "not trusted".
        (ecode, _, eerr) = Tools.Run("qemu-img", ["info", .. QemuTls(certs.Client), "--image-opts", QemuImage(e)], TimeSpan.FromSeconds(30));
        output.WriteLine($"expired, qemu-img: {ecode}: {eerr.Trim()}");
        Assert.NotEqual(0, ecode);
        Assert.Contains("certificate", eerr, StringComparison.Ordinal);
        WaitFor(() => e.Server.TlsFailures >= 2);
        Assert.Equal(0, e.Server.InternalErrors);
    }

    [Fact]
    public void RequireRefusesPlainClientsWithTlsReqdAndLeaksNoExportName()
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(NbdTlsMode.Require, log: log, export: "secret-export");
        // Real clients without TLS: refused, and they say why.
        var (code, _, stderr) = Tools.Run("nbdinfo", ["--list", $"nbd://127.0.0.1:{s.Server.Address.Port}/"], TimeSpan.FromSeconds(30));
        output.WriteLine($"nbdinfo --list: {code}: {stderr.Trim()}");
        Assert.NotEqual(0, code);
        Assert.DoesNotContain("secret-export", stderr, StringComparison.Ordinal);
        (code, _, stderr) = Tools.Run("nbdinfo", [$"nbd://127.0.0.1:{s.Server.Address.Port}/secret-export"], TimeSpan.FromSeconds(30));
        output.WriteLine($"nbdinfo: {code}: {stderr.Trim()}");
        // libnbd reports NBD_REP_ERR_TLS_REQD as ENOTSUP.
        Assert.NotEqual(0, code);
        Assert.Contains("not supported", stderr, StringComparison.Ordinal);
        var (qcode, _, qerr) = Tools.Run("qemu-img", ["info", $"nbd://127.0.0.1:{s.Server.Address.Port}/secret-export"], TimeSpan.FromSeconds(30));
        output.WriteLine($"qemu-img: {qcode}: {qerr.Trim()}");
        Assert.NotEqual(0, qcode);
        Assert.Contains("TLS", qerr, StringComparison.Ordinal);

        // By hand: every option but STARTTLS and ABORT gets TLS_REQD, and nothing says what is exported.
        using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
        Assert.Equal(FlagFixedNewstyle | FlagNoZeroes, c.ReadGreeting());
        c.SendClientFlags();
        var wire = new List<byte>();
        foreach (var (option, data) in new (uint, byte[])[]
        {
            (OptList, []), (OptInfo, RawNbd.GoData("secret-export")), (OptGo, RawNbd.GoData("")), (OptStructuredReply, []),
            (OptListMetaContext, RawNbd.MetaData("secret-export")), (OptSetMetaContext, RawNbd.MetaData("", BaseAllocation)), (99, []),
        })
        {
            c.SendOption(option, data);
            var (replyTo, type, body) = c.ReadOptionReply();
            Assert.Equal((option, RepErrTlsReqd), (replyTo, type));
            wire.AddRange(body);
        }
        Assert.DoesNotContain("secret", Encoding.UTF8.GetString([.. wire]), StringComparison.Ordinal);
        c.SendOption(OptStartTls, [1]);
        Assert.Equal(RepErrInvalid, c.ReadOptionReply().Type);
        c.SendOption(OptStartTls, []);
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        using var tls = ClientTls(c.Socket);
        // Inside TLS: a second STARTTLS is invalid, the rest works, and LIST now names the export.
        SendOption(tls, OptStartTls, []);
        Assert.Equal(RepErrInvalid, ReadOptionReply(tls).Type);
        SendOption(tls, OptList, []);
        var listed = ReadOptionReply(tls);
        Assert.Equal(RepServer, listed.Type);
        Assert.Contains("secret-export", Encoding.UTF8.GetString(listed.Data), StringComparison.Ordinal);
        Assert.Equal(RepAck, ReadOptionReply(tls).Type);
        SendOption(tls, OptGo, RawNbd.GoData("secret-export"));
        while (ReadOptionReply(tls).Type != RepAck)
        {
        }
        var payload = Encoding.ASCII.GetBytes(new string('t', 4096));
        tls.Write(Request(CmdWrite, 1, 8192, 4096, payload));
        Assert.Equal(0u, SimpleReply(tls, 1));
        tls.Write(Request(CmdRead, 2, 8192, 4096));
        Assert.Equal(0u, SimpleReply(tls, 2));
        Assert.Equal(payload, ReadExactly(tls, 4096));

        // EXPORT_NAME before TLS cannot be answered with an error: the connection ends.
        using var e = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
        e.ReadGreeting();
        e.SendClientFlags();
        e.SendOption(OptExportName, Encoding.UTF8.GetBytes("secret-export"));
        Assert.True(e.IsClosedByServer(5000));
        Assert.True(s.Server.TlsRequiredRefusals >= 8, $"{s.Server.TlsRequiredRefusals} refusals counted");
        Assert.Contains(log.Messages, m => m.Contains("before STARTTLS: TLS is required", StringComparison.Ordinal));
        Assert.Equal(0, s.Server.InternalErrors);
    }

    [Fact]
    public void TlsOnServesPlainAndTlsClientsAndOffRefusesStartTls()
    {
        using (var s = Serve(NbdTlsMode.On))
        {
            Nbdsh(Nbds(s, certs.Client), "h.pwrite(b'o' * 512, 0)\nassert h.get_tls_negotiated()");
            Nbdsh($"nbd://127.0.0.1:{s.Server.Address.Port}/disk", "assert h.pread(512, 0) == b'o' * 512\nassert not h.get_tls_negotiated()");
        }
        using var off = new TestServer(new MemoryTarget(1 << 20), "disk", tcp: true);
        using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, off.Server.Address.Port));
        c.ReadGreeting();
        c.SendClientFlags();
        c.SendOption(OptStartTls, []);
        Assert.Equal(RepErrUnsup, c.ReadOptionReply().Type);
        var (code, _, _) = Tools.Run("nbdinfo", [Nbds(off, certs.Client)], TimeSpan.FromSeconds(30));
        Assert.NotEqual(0, code);
    }

    /// <summary>Through a proxy that records every byte: the export's data and name never cross the wire in the clear.</summary>
    [Fact]
    public void NothingCrossesTheWireInTheClear()
    {
        using var s = Serve(NbdTlsMode.On, export: "classified-disk");
        const string script = """
            secret = b'PLAINTEXT-MARKER' * 4096
            h.pwrite(secret, 0)
            assert h.pread(len(secret), 0) == secret
            """;
        using (var proxy = new RecordingProxy(s.Server.Address.Port))
        {
            Nbdsh(Nbds(s, certs.Client, proxy.Port), script);
            var seen = proxy.Seen();
            Assert.True(seen.Length > 100_000, $"the proxy saw only {seen.Length} bytes");
            Assert.Equal(-1, seen.AsSpan().IndexOf("PLAINTEXT-MARKER"u8));
            Assert.Equal(-1, seen.AsSpan().IndexOf("classified"u8));
        }
        // The same through the same proxy without TLS shows both: the check can see a leak.
        using (var proxy = new RecordingProxy(s.Server.Address.Port))
        {
            Nbdsh($"nbd://127.0.0.1:{proxy.Port}/classified-disk", script);
            var seen = proxy.Seen();
            Assert.NotEqual(-1, seen.AsSpan().IndexOf("PLAINTEXT-MARKER"u8));
            Assert.NotEqual(-1, seen.AsSpan().IndexOf("classified"u8));
        }
    }

    /// <summary>
    /// The TLS handshake falls under the handshake deadline: a client that stalls in it, or trickles
    /// it a byte at a time (each read sees data well within the timeout), is cut off when the
    /// deadline from its connect passes.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void AStalledTlsHandshakeIsDroppedAtTheHandshakeTimeout(bool trickle)
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(NbdTlsMode.Require, log: log, handshakeTimeout: TimeSpan.FromSeconds(1));
        var clock = Stopwatch.StartNew();
        using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
        c.ReadGreeting();
        c.SendClientFlags();
        c.SendOption(OptStartTls, []);
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        // The start of a ClientHello record that announces 16 KiB and never delivers them.
        byte[] hello = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03, .. new byte[32]];
        var closed = false;
        if (trickle)
        {
            for (var i = 0; i < hello.Length && clock.Elapsed < TimeSpan.FromSeconds(8) && !closed; i++)
            {
                try
                {
                    c.Send([hello[i]]);
                }
                catch (SocketException)
                {
                    closed = true;
                    break;
                }
                closed = c.IsClosedByServer(200);
            }
        }
        else
        {
            c.Send(hello);
            closed = c.IsClosedByServer(6000);
        }
        Assert.True(closed, "the server kept a stalled TLS handshake open");
        output.WriteLine($"cut off after {clock.Elapsed.TotalSeconds:F2} s");
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(0.8), TimeSpan.FromSeconds(4));
        WaitFor(() => s.Server.TlsFailures + s.Server.HandshakeTimeouts >= 1);
        if (trickle)
        {
            Assert.Equal(1, s.Server.HandshakeTimeouts);
        }
        Assert.Equal(0, s.Server.InternalErrors);
        Assert.Contains("OK", Nbdsh(Nbds(s, certs.Client), "print('OK')"), StringComparison.Ordinal);
    }

    /// <summary>1,000 seeded garbage ClientHellos: each ends its connection, the server lives on and logs a few lines, not 200.</summary>
    [Fact]
    public void GarbageClientHellosDoNoHarm()
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(NbdTlsMode.Require, log: log);
        var random = new Random(20261207);
        const int count = 1000;
        var clock = Stopwatch.StartNew();
        for (var i = 0; i < count; i++)
        {
            using var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
            c.ReadGreeting();
            c.SendClientFlags();
            c.SendOption(OptStartTls, []);
            Assert.Equal(RepAck, c.ReadOptionReply().Type);
            var garbage = new byte[random.Next(1, 2048)];
            random.NextBytes(garbage);
            if (i % 2 == 0 && garbage.Length > 5)
            {
                // A plausible handshake record header, so the parser gets past the first bytes.
                garbage[0] = 0x16;
                garbage[1] = 0x03;
                garbage[2] = (byte)random.Next(0, 5);
                BinaryPrimitives.WriteUInt16BigEndian(garbage.AsSpan(3), (ushort)(garbage.Length - 5));
                if (i % 4 == 0)
                {
                    garbage[5] = 0x01; // ClientHello
                }
            }
            try
            {
                c.Send(garbage);
                c.Socket.Shutdown(SocketShutdown.Send);
            }
            catch (SocketException)
            {
                // The server may have given up already and reset the connection.
            }
            Assert.True(c.IsClosedByServer(5000), $"garbage ClientHello {i} left the connection open");
        }
        output.WriteLine($"{count} garbage ClientHellos in {clock.Elapsed.TotalSeconds:F1} s; {s.Server.TlsFailures} TLS failures; {log.Entries.Count} log lines");
        WaitFor(() => s.Server.TlsFailures == count);
        Assert.Equal(count, s.Server.TlsFailures);
        Assert.Equal(0, s.Server.InternalErrors);
        Assert.InRange(log.Messages.Count(m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal)), 1, 5);
        Assert.Contains("OK", Nbdsh(Nbds(s, certs.Client), "h.pwrite(b'g' * 4096, 0)\nassert h.pread(4096, 0) == b'g' * 4096\nprint('OK')"), StringComparison.Ordinal);
    }

    [Fact]
    public void LoadRefusesMissingAndBadFilesClearly()
    {
        var empty = Directory.CreateTempSubdirectory("ublksharp-tls-bad-").FullName;
        try
        {
            var e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(Path.Combine(empty, "nope"), NbdTlsMode.Require, false));
            Assert.Contains("does not exist", e.Message, StringComparison.Ordinal);
            e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(empty, NbdTlsMode.Require, false));
            Assert.Contains("server-cert.pem is missing", e.Message, StringComparison.Ordinal);
            File.Copy(Path.Combine(certs.Server, "server-cert.pem"), Path.Combine(empty, "server-cert.pem"));
            File.WriteAllText(Path.Combine(empty, "server-key.pem"), "not a key\n");
            e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(empty, NbdTlsMode.Require, false));
            Assert.Contains("cannot load", e.Message, StringComparison.Ordinal);
            // The key of another certificate.
            File.Copy(Path.Combine(certs.Client, "client-key.pem"), Path.Combine(empty, "server-key.pem"), overwrite: true);
            e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(empty, NbdTlsMode.Require, false));
            Assert.Contains("cannot load", e.Message, StringComparison.Ordinal);
            File.Copy(Path.Combine(certs.Server, "server-key.pem"), Path.Combine(empty, "server-key.pem"), overwrite: true);
            e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(empty, NbdTlsMode.Require, true));
            Assert.Contains("ca-cert.pem is missing", e.Message, StringComparison.Ordinal);
            Assert.NotNull(NbdTlsOptions.Load(empty, NbdTlsMode.Require, false));
            e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.Load(certs.ExpiredServer, NbdTlsMode.Require, false));
            Assert.Contains("is valid only from", e.Message, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(empty, recursive: true);
        }
    }

    /// <summary>
    /// With --tls require a listener beyond loopback needs no --insecure (TEST-NET-1: the bind fails,
    /// nothing is exposed); an expired certificate and a key others can read are caught at start.
    /// </summary>
    [Fact]
    public void ServeChecksItsCertificatesAndAllowsRequireBeyondLoopback()
    {
        var (code, _, stderr) = NbdCliTests.Cli($"serve -t mem --size 16M --listen tcp://192.0.2.1:10809 --tls require --tls-certificates {certs.Server}");
        Assert.Equal(1, code);
        Assert.DoesNotContain("--insecure", stderr, StringComparison.Ordinal);
        Assert.Contains("cannot listen on tcp://192.0.2.1:10809", stderr, StringComparison.Ordinal);
        (code, _, stderr) = NbdCliTests.Cli($"serve -t mem --size 16M --listen tcp://127.0.0.1:0 --tls require --tls-certificates {certs.ExpiredServer}");
        Assert.Equal(1, code);
        Assert.Contains("is valid only from", Assert.Single(stderr.Trim().Split('\n')), StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);

        var open = Path.Combine(certs.Root, "open-key");
        Directory.CreateDirectory(open);
        foreach (var f in new[] { "ca-cert.pem", "server-cert.pem", "server-key.pem" })
        {
            File.Copy(Path.Combine(certs.Server, f), Path.Combine(open, f), overwrite: true);
        }
        if (!OperatingSystem.IsWindows())
        {
            File.SetUnixFileMode(Path.Combine(open, "server-key.pem"), UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        }
        using var p = Process.Start(NbdCliTests.CliStart($"serve -t mem --size 16M --listen tcp://127.0.0.1:0 --export disk --tls require --tls-certificates {open} --tls-verify-peer"))!;
        try
        {
            var address = p.StandardOutput.ReadLine();
            Assert.NotNull(address);
            var port = int.Parse(address[(address.LastIndexOf(':') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
            Nbdsh($"nbds://127.0.0.1:{port}/disk?tls-certificates={certs.Client}", "h.pwrite(b'c' * 4096, 0)\nassert h.pread(4096, 0) == b'c' * 4096");
            var (refused, _, _) = Tools.Run("nbdinfo", [$"nbd://127.0.0.1:{port}/disk"], TimeSpan.FromSeconds(30));
            Assert.NotEqual(0, refused);
            Processes.Signal(p.Id, 15);
            Assert.True(p.WaitForExit(20_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, p.ExitCode);
            var err = p.StandardError.ReadToEnd();
            output.WriteLine(err);
            Assert.Contains("server-key.pem can be read or written by other users", err, StringComparison.Ordinal);
            Assert.Contains("before STARTTLS: TLS is required", err, StringComparison.Ordinal);
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
            }
        }
    }

    /// <summary>nbdsh with the URI's tls-certificates allowed (libnbd refuses local files named in a URI by default).</summary>
    internal static string Nbdsh(string uri, string script)
    {
        var prelude = $"h.set_uri_allow_local_file(True)\nh.connect_uri({Tools.Py(uri)})\n";
        var (code, stdout, stderr) = Tools.Run("/usr/bin/python3", ["-m", "nbd", "-c", "-"], TimeSpan.FromSeconds(60), prelude + script);
        Assert.True(code == 0, $"nbdsh failed ({code}):\n{script}\nstdout: {stdout}\nstderr: {stderr}");
        return stdout;
    }

    private static void WaitFor(Func<bool> condition)
    {
        for (var i = 0; i < 100 && !condition(); i++)
        {
            Thread.Sleep(50);
        }
    }

    /// <summary>A .NET TLS client over a raw connection after STARTTLS; <paramref name="clientDir"/>'s certificate is sent whatever CAs the server names.</summary>
    private SslStream ClientTls(Socket socket, string? clientDir = null)
    {
        var tls = new SslStream(new NetworkStream(socket, ownsSocket: false));
        var policy = new X509ChainPolicy { TrustMode = X509ChainTrustMode.CustomRootTrust, RevocationMode = X509RevocationMode.NoCheck };
        policy.CustomTrustStore.ImportFromPemFile(Path.Combine(certs.Server, "ca-cert.pem"));
        var options = new SslClientAuthenticationOptions
        {
            TargetHost = "localhost",
            CertificateChainPolicy = policy,
            RemoteCertificateValidationCallback = (_, _, _, errors) => errors == SslPolicyErrors.None,
        };
        if (clientDir is not null)
        {
            using var pem = X509Certificate2.CreateFromPemFile(Path.Combine(clientDir, "client-cert.pem"), Path.Combine(clientDir, "client-key.pem"));
            var mine = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
            options.ClientCertificates = [mine];
            options.LocalCertificateSelectionCallback = (_, _, _, _, _) => mine;
        }
        tls.AuthenticateAsClient(options);
        return tls;
    }

    private static void SendOption(Stream s, uint option, byte[] data)
    {
        var m = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(m, OptionMagic);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(12), (uint)data.Length);
        data.CopyTo(m, 16);
        s.Write(m);
    }

    private static (uint Option, uint Type, byte[] Data) ReadOptionReply(Stream s)
    {
        var h = ReadExactly(s, 20);
        Assert.Equal(OptionReplyMagic, BinaryPrimitives.ReadUInt64BigEndian(h));
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8)), BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)), ReadExactly(s, (int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16))));
    }

    private static byte[] Request(ushort type, ulong cookie, ulong offset, uint length, byte[]? payload = null)
    {
        var m = new byte[RequestSize + (payload?.Length ?? 0)];
        BinaryPrimitives.WriteUInt32BigEndian(m, RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(m.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(24), length);
        payload?.CopyTo(m, RequestSize);
        return m;
    }

    private static uint SimpleReply(Stream s, ulong cookie)
    {
        var r = ReadExactly(s, SimpleReplySize);
        Assert.Equal(SimpleReplyMagic, BinaryPrimitives.ReadUInt32BigEndian(r));
        Assert.Equal(cookie, BinaryPrimitives.ReadUInt64BigEndian(r.AsSpan(8)));
        return BinaryPrimitives.ReadUInt32BigEndian(r.AsSpan(4));
    }

    private static byte[] ReadExactly(Stream s, int count)
    {
        var b = new byte[count];
        s.ReadExactly(b);
        return b;
    }

    /// <summary>A loopback TCP proxy to one port that keeps a copy of every byte it forwards, both ways.</summary>
    private sealed class RecordingProxy : IDisposable
    {
        private readonly Socket _listener = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        private readonly MemoryStream _seen = new();
        private readonly List<Socket> _sockets = [];
        private readonly List<Thread> _pumps = [];

        public RecordingProxy(int upstreamPort)
        {
            _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            _listener.Listen(4);
            Port = ((IPEndPoint)_listener.LocalEndPoint!).Port;
            new Thread(() =>
            {
                try
                {
                    while (true)
                    {
                        var client = _listener.Accept();
                        var upstream = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                        upstream.Connect(new IPEndPoint(IPAddress.Loopback, upstreamPort));
                        lock (_sockets)
                        {
                            _sockets.Add(client);
                            _sockets.Add(upstream);
                            _pumps.Add(Pump(client, upstream));
                            _pumps.Add(Pump(upstream, client));
                        }
                    }
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                }
            })
            { IsBackground = true }.Start();
        }

        public int Port { get; }

        /// <summary>Everything forwarded so far, once the client has gone (both directions end).</summary>
        public byte[] Seen()
        {
            Thread[] pumps;
            lock (_sockets)
            {
                pumps = [.. _pumps];
            }
            foreach (var t in pumps)
            {
                t.Join(TimeSpan.FromSeconds(10));
            }
            lock (_seen)
            {
                return _seen.ToArray();
            }
        }

        private Thread Pump(Socket from, Socket to)
        {
            var t = new Thread(() =>
            {
                var buffer = new byte[65536];
                try
                {
                    int n;
                    while ((n = from.Receive(buffer)) > 0)
                    {
                        lock (_seen)
                        {
                            _seen.Write(buffer, 0, n);
                        }
                        to.Send(buffer.AsSpan(0, n));
                    }
                    to.Shutdown(SocketShutdown.Send);
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                    try
                    {
                        to.Shutdown(SocketShutdown.Both);
                    }
                    catch (Exception f) when (f is SocketException or ObjectDisposedException)
                    {
                    }
                }
            })
            { IsBackground = true };
            t.Start();
            return t;
        }

        public void Dispose()
        {
            _listener.Dispose();
            lock (_sockets)
            {
                foreach (var s in _sockets)
                {
                    s.Dispose();
                }
            }
        }
    }
}
