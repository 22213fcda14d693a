using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>psktool key files for the TLS-PSK tests: alice's, alice with another key, and bob's (whom the server does not know).</summary>
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public sealed class PskKeys : IDisposable
{
    public PskKeys()
    {
        Root = Directory.CreateTempSubdirectory("ublksharp-psk-").FullName;
        Make("server", "alice");
        Make("wrong", "alice");
        Make("bob", "bob");
    }

    public string Root { get; }

    /// <summary>The server's key file, and the directory qemu reads keys.psk from.</summary>
    public string Server => Path.Combine(Root, "server", "keys.psk");

    public string Dir(string name) => Path.Combine(Root, name);

    public string File(string name) => Path.Combine(Root, name, "keys.psk");

    private void Make(string name, string user)
    {
        Directory.CreateDirectory(Dir(name));
        Tools.Ok("psktool", "-u", user, "-p", File(name));
        System.IO.File.SetUnixFileMode(File(name), UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    public void Dispose() => Directory.Delete(Root, recursive: true);
}

/// <summary>
/// NBD over TLS with pre-shared keys (GnuTLS on the server) against libnbd's tools and qemu, which
/// use GnuTLS too: data both ways, refusals (wrong key, unknown user, no TLS) that leave the server
/// serving, the handshake's time bound, and serve's checks of the key file.
/// </summary>
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public class NbdTlsPskTests(PskKeys keys, ITestOutputHelper output) : IClassFixture<PskKeys>
{
    private TestServer Serve(CapturingLoggerFactory? log = null, NbdTlsMode mode = NbdTlsMode.Require, TimeSpan? handshakeTimeout = null, bool tcp = true)
        => new(new MemoryTarget(16 << 20), "disk", options: new NbdServerOptions
        {
            Tls = NbdTlsOptions.LoadPsk(keys.Server, mode),
            LoggerFactory = log ?? new CapturingLoggerFactory(),
            HandshakeTimeout = handshakeTimeout ?? TimeSpan.FromSeconds(10),
        }, tcp: tcp);

    private static string Nbds(TestServer s, string user, string keyFile)
        => s.Server.Address.IsUnix
            ? $"nbds+unix://{user}@/disk?socket={s.SocketPath}&tls-psk-file={keyFile}"
            : $"nbds://{user}@127.0.0.1:{s.Server.Address.Port}/disk?tls-psk-file={keyFile}";

    private static string[] QemuPsk(string dir, string user) => ["--object", $"tls-creds-psk,id=tls0,endpoint=client,dir={dir},username={user}"];

    private static string QemuImage(TestServer s) => $"driver=nbd,host=127.0.0.1,port={s.Server.Address.Port},export=disk,tls-creds=tls0";

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void NbdcopyWritesAndReadsBackOverPsk(bool tcp)
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(log, tcp: tcp);
        var pattern = new byte[16 << 20];
        new Random(16).NextBytes(pattern.AsSpan(0, 6 << 20));
        var source = s.TempPath("source.raw");
        File.WriteAllBytes(source, pattern);
        Tools.Ok("nbdcopy", source, Nbds(s, "alice", keys.Server));
        // Through the server's target: what the client wrote is there.
        var inTarget = new byte[pattern.Length];
        Assert.Equal(inTarget.Length, s.Target.Read(inTarget, 0));
        Assert.True(pattern.AsSpan().SequenceEqual(inTarget), "nbdcopy's write over TLS-PSK did not reach the target intact");
        var back = s.TempPath("back.raw");
        Tools.Ok("nbdcopy", Nbds(s, "alice", keys.Server), back);
        Assert.True(pattern.AsSpan().SequenceEqual(File.ReadAllBytes(back)), "nbdcopy read back other bytes over TLS-PSK");
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", Nbds(s, "alice", keys.Server)));
        Assert.Equal(16L << 20, json.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64());
        Assert.True(json.RootElement.GetProperty("TLS").GetBoolean());
        // nbdsh (libnbd's Python shell) as well: a read of what nbdcopy wrote, and a write of its own.
        var expect = Convert.ToHexString(pattern.AsSpan(4096, 4096)).ToLowerInvariant();
        Assert.Contains("OK", NbdTlsTests.Nbdsh(Nbds(s, "alice", keys.Server),
            $"assert h.pread(4096, 4096).hex() == '{expect}'\nh.pwrite(b'p' * 4096, 12 << 20)\nassert h.pread(4096, 12 << 20) == b'p' * 4096\nprint('OK')"), StringComparison.Ordinal);
        Assert.Equal(0, s.Server.TlsFailures);
        var line = log.Messages.First(m => m.StartsWith("nbd: TLS-PSK client", StringComparison.Ordinal));
        output.WriteLine(line);
        Assert.StartsWith("nbd: TLS-PSK client 'alice' authenticated: TLS1.3 ", line, StringComparison.Ordinal);
    }

    [Fact]
    public void QemuImgAndQemuIoOverPsk()
    {
        using var s = Serve();
        var info = Tools.Ok("qemu-img", ["info", .. QemuPsk(keys.Dir("server"), "alice"), "--image-opts", QemuImage(s)]);
        Assert.Contains("16 MiB (16777216 bytes)", info, StringComparison.Ordinal);
        var io = Tools.Ok("qemu-io", [.. QemuPsk(keys.Dir("server"), "alice"), "--image-opts", QemuImage(s), "-c", "write -P 0xa5 1M 192k", "-c", "read -P 0xa5 1M 192k"]);
        Assert.DoesNotContain("fail", io, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("mismatch", io, StringComparison.OrdinalIgnoreCase);
        var check = new byte[192 << 10];
        Assert.Equal(check.Length, s.Target.Read(check, 1 << 20));
        Assert.True(check.AsSpan().IndexOfAnyExcept((byte)0xa5) < 0, "qemu-io's write did not reach the target");
        Assert.Equal(0, s.Server.TlsFailures);
    }

    /// <summary>
    /// A wrong key, a user the key file does not hold, and a client without TLS: each refused and
    /// logged (each against a server of its own, as the log says one failure per 10 s), and a good
    /// client is served afterwards.
    /// </summary>
    [Theory]
    [InlineData("wrong", "alice")]
    [InlineData("bob", "bob")]
    [InlineData("plain", "")]
    public void RefusedClientsAreLoggedAndTheServerServesOn(string who, string user)
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(log);
        var uri = who == "plain" ? $"nbd://127.0.0.1:{s.Server.Address.Port}/disk" : Nbds(s, user, keys.File(who));
        var (code, _, stderr) = Tools.Run("nbdinfo", [uri], TimeSpan.FromSeconds(30));
        output.WriteLine($"{who}: nbdinfo exited {code}: {stderr.Trim()}");
        Assert.NotEqual(0, code);
        if (who == "plain")
        {
            WaitFor(() => s.Server.TlsRequiredRefusals >= 1);
            Assert.Contains(log.Messages, m => m.Contains("TLS is required", StringComparison.Ordinal));
            Assert.Equal(0, s.Server.TlsFailures);
        }
        else
        {
            // The client learns why from the server's alert rather than from a cut connection.
            Assert.Contains("A TLS fatal alert has been received", stderr, StringComparison.Ordinal);
            WaitFor(() => s.Server.TlsFailures == 1);
            Assert.Equal(1, s.Server.TlsFailures);
            var line = Assert.Single(log.Messages, m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal));
            output.WriteLine(line);
            Assert.Contains("the client's PSK does not match: a wrong key, or a username the key file does not hold", line, StringComparison.Ordinal);
            // qemu is refused the same way.
            var (qcode, _, qerr) = Tools.Run("qemu-img", ["info", .. QemuPsk(keys.Dir(who), user), "--image-opts", QemuImage(s)], TimeSpan.FromSeconds(30));
            output.WriteLine($"{who}, qemu-img: {qcode}: {qerr.Trim()}");
            Assert.NotEqual(0, qcode);
            WaitFor(() => s.Server.TlsFailures == 2);
            Assert.Equal(2, s.Server.TlsFailures);
        }
        Assert.DoesNotContain(log.Messages, m => m.StartsWith("nbd: TLS-PSK client", StringComparison.Ordinal));
        Assert.Equal(0, s.Server.InternalErrors);
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", Nbds(s, "alice", keys.Server)));
        Assert.Equal(16L << 20, json.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64());
        Assert.Contains(log.Messages, m => m.StartsWith("nbd: TLS-PSK client 'alice' authenticated", StringComparison.Ordinal));
    }

    /// <summary>
    /// --tls require with PSK: a client that skips STARTTLS gets only TLS_REQD replies, none of which
    /// names the export; after STARTTLS and the PSK handshake, the same server lists it.
    /// </summary>
    [Fact]
    public void RequireRefusesPlainOptionsAndLeaksNoExportName()
    {
        var log = new CapturingLoggerFactory();
        using var s = new TestServer(new MemoryTarget(1 << 20), "secret-export", options: new NbdServerOptions
        {
            Tls = NbdTlsOptions.LoadPsk(keys.Server, NbdTlsMode.Require),
            LoggerFactory = log,
        }, tcp: true);
        using (var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port)))
        {
            c.ReadGreeting();
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
            Assert.DoesNotContain("secret", System.Text.Encoding.UTF8.GetString([.. wire]), StringComparison.Ordinal);
        }
        var (code, stdout, stderr) = Tools.Run("nbdinfo", ["--list", $"nbd://127.0.0.1:{s.Server.Address.Port}/"], TimeSpan.FromSeconds(30));
        Assert.NotEqual(0, code);
        Assert.DoesNotContain("secret-export", stdout + stderr, StringComparison.Ordinal);
        Assert.True(s.Server.TlsRequiredRefusals >= 7, $"{s.Server.TlsRequiredRefusals} refusals counted");
        Assert.Equal(0, s.Server.TlsFailures);
        var listed = Tools.Ok("nbdinfo", "--list", $"nbds://alice@127.0.0.1:{s.Server.Address.Port}/?tls-psk-file={keys.Server}");
        Assert.Contains("secret-export", listed, StringComparison.Ordinal);
        Assert.Equal(0, s.Server.InternalErrors);
    }

    /// <summary>--tls on with PSK: plain clients and PSK clients are both served, and see the same data.</summary>
    [Fact]
    public void TlsOnServesPlainAndPskClients()
    {
        using var s = Serve(mode: NbdTlsMode.On);
        var pattern = new byte[1 << 20];
        new Random(7).NextBytes(pattern);
        var source = s.TempPath("source.raw");
        File.WriteAllBytes(source, pattern);
        Tools.Ok("nbdcopy", "--destination-is-zero", source, $"nbd://127.0.0.1:{s.Server.Address.Port}/disk");
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", Nbds(s, "alice", keys.Server)));
        Assert.True(json.RootElement.GetProperty("TLS").GetBoolean());
        using var plain = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", $"nbd://127.0.0.1:{s.Server.Address.Port}/disk"));
        Assert.False(plain.RootElement.GetProperty("TLS").GetBoolean());
        var back = s.TempPath("back.raw");
        Tools.Ok("nbdcopy", Nbds(s, "alice", keys.Server), back);
        Assert.True(pattern.AsSpan().SequenceEqual(File.ReadAllBytes(back).AsSpan(0, pattern.Length)), "a PSK client read other bytes than a plain client wrote");
        Assert.Equal(0, s.Server.TlsFailures);
    }

    /// <summary>GnuTLS reads the socket itself; the handshake's time bound still holds.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void AStalledPskHandshakeIsDroppedAtTheHandshakeTimeout(bool trickle)
    {
        using var s = Serve(handshakeTimeout: TimeSpan.FromSeconds(1));
        var clock = Stopwatch.StartNew();
        using var c = StartTls(s);
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
        Assert.True(closed, "the server kept a stalled TLS-PSK handshake open");
        output.WriteLine($"cut off after {clock.Elapsed.TotalSeconds:F2} s");
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(0.8), TimeSpan.FromSeconds(4));
        WaitFor(() => s.Server.TlsFailures + s.Server.HandshakeTimeouts >= 1);
        Assert.Equal(0, s.Server.InternalErrors);
        Tools.Ok("nbdinfo", Nbds(s, "alice", keys.Server));
    }

    /// <summary>Seeded garbage where a ClientHello belongs: each connection ends, the log stays short, the server serves on.</summary>
    [Fact]
    public void GarbageClientHellosDoNoHarm()
    {
        var log = new CapturingLoggerFactory();
        using var s = Serve(log);
        var random = new Random(20261207);
        const int count = 50;
        for (var i = 0; i < count; i++)
        {
            using var c = StartTls(s);
            var garbage = new byte[random.Next(6, 2048)];
            random.NextBytes(garbage);
            if (i % 2 == 0)
            {
                // A plausible ClientHello record header, so the parser gets past the first bytes.
                garbage[0] = 0x16;
                garbage[1] = 0x03;
                garbage[2] = 0x01;
                BinaryPrimitives.WriteUInt16BigEndian(garbage.AsSpan(3), (ushort)(garbage.Length - 5));
                garbage[5] = 0x01;
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
        WaitFor(() => s.Server.TlsFailures == count);
        Assert.Equal(count, s.Server.TlsFailures);
        Assert.Equal(0, s.Server.InternalErrors);
        Assert.InRange(log.Messages.Count(m => m.StartsWith("nbd: TLS handshake failed", StringComparison.Ordinal)), 1, 5);
        Tools.Ok("nbdinfo", Nbds(s, "alice", keys.Server));
    }

    [Fact]
    public void LoadPskRefusesMissingAndBadFilesClearly()
    {
        var dir = keys.Dir("bad");
        Directory.CreateDirectory(dir);
        var missing = Path.Combine(dir, "missing.psk");
        Assert.Contains("cannot read the PSK file", Assert.Throws<ArgumentException>(() => NbdTlsOptions.LoadPsk(missing, NbdTlsMode.Require)).Message, StringComparison.Ordinal);
        foreach (var (text, why) in new[]
        {
            ("", "holds no key"),
            ("\n\n", "holds no key"),
            ("alice:b384d6\nthis is not a key file\n", "line 2 is not 'username:hexkey'"),
            (":b384d6\n", "line 1 is not"),
            ("alice:\n", "line 1 is not"),
            ("alice:b384d\n", "line 1 is not"),
            ("alice:zz84d6\n", "line 1 is not"),
        })
        {
            var file = Path.Combine(dir, "bad.psk");
            File.WriteAllText(file, text);
            var e = Assert.Throws<ArgumentException>(() => NbdTlsOptions.LoadPsk(file, NbdTlsMode.Require));
            Assert.Contains(why, e.Message, StringComparison.Ordinal);
        }
        Assert.Equal(keys.Server, NbdTlsOptions.LoadPsk(keys.Server, NbdTlsMode.On).PskFile);
        // Exactly one kind of credentials, and verify-peer is x509's.
        Assert.Throws<ArgumentException>(() => new NbdTlsOptions { PskFile = keys.Server, VerifyPeer = true }.Validate());
        Assert.Throws<ArgumentException>(() => new NbdTlsOptions().Validate());
    }

    [Fact]
    public void ServeChecksItsKeyFileAndServesPskClients()
    {
        var dir = keys.Dir("cli");
        Directory.CreateDirectory(dir);
        var garbage = Path.Combine(dir, "garbage.psk");
        File.WriteAllText(garbage, "not a key\n");
        File.SetUnixFileMode(garbage, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        var open = Path.Combine(dir, "open.psk");
        File.Copy(keys.Server, open, overwrite: true);
        File.SetUnixFileMode(open, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        // The rows that need no file are in NbdCliTests' bad serve input theory.
        foreach (var (args, why) in new[]
        {
            ($"--tls require --tls-psk {garbage}", "line 1 is not 'username:hexkey'"),
            ($"--tls require --tls-psk {open}", "open.psk can be read or written by other users than its owner: chmod 600 it"),
            ($"--tls on --tls-psk {keys.Server} --tls-certificates {dir}", "--tls-psk cannot be combined with"),
        })
        {
            var (code, _, stderr) = NbdCliTests.Cli($"serve -t mem --size 16M --listen tcp://127.0.0.1:0 {args}");
            output.WriteLine($"{args}: {code}: {stderr.Trim()}");
            Assert.Equal(1, code);
            Assert.Contains(why, Assert.Single(stderr.Trim().Split('\n')), StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);
        }
        // --tls require with PSK counts as TLS for a listener beyond loopback.
        var (c, _, err) = NbdCliTests.Cli($"serve -t mem --size 16M --listen tcp://192.0.2.1:10809 --tls require --tls-psk {keys.Server}");
        Assert.Equal(1, c);
        Assert.DoesNotContain("--insecure", err, StringComparison.Ordinal);
        Assert.Contains("cannot listen on tcp://192.0.2.1:10809", err, StringComparison.Ordinal);

        using var p = Process.Start(NbdCliTests.CliStart($"serve -t mem --size 16M --listen tcp://127.0.0.1:0 --export disk --tls require --tls-psk {keys.Server}"))!;
        try
        {
            var address = p.StandardOutput.ReadLine();
            Assert.NotNull(address);
            var port = int.Parse(address[(address.LastIndexOf(':') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
            var uri = $"nbds://alice@127.0.0.1:{port}/disk?tls-psk-file={keys.Server}";
            Tools.Ok("nbdinfo", uri);
            var (refused, _, _) = Tools.Run("nbdinfo", [$"nbds://alice@127.0.0.1:{port}/disk?tls-psk-file={keys.File("wrong")}"], TimeSpan.FromSeconds(30));
            Assert.NotEqual(0, refused);
            Tools.Ok("nbdinfo", uri);
            Processes.Signal(p.Id, 15);
            Assert.True(p.WaitForExit(20_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, p.ExitCode);
            var log = p.StandardError.ReadToEnd();
            output.WriteLine(log);
            Assert.Contains("(TLS require, PSK)", log, StringComparison.Ordinal);
            Assert.Contains("nbd: TLS-PSK client 'alice' authenticated: TLS1.3", log, StringComparison.Ordinal);
            Assert.Contains("nbd: TLS handshake failed, client cut off: the client's PSK does not match", log, StringComparison.Ordinal);
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
            }
        }
    }

    private static RawNbd StartTls(TestServer s)
    {
        var c = new RawNbd(new IPEndPoint(IPAddress.Loopback, s.Server.Address.Port));
        c.ReadGreeting();
        c.SendClientFlags();
        c.SendOption(OptStartTls, []);
        Assert.Equal(RepAck, c.ReadOptionReply().Type);
        return c;
    }

    private static void WaitFor(Func<bool> condition)
    {
        for (var i = 0; i < 100 && !condition(); i++)
        {
            Thread.Sleep(50);
        }
    }
}
