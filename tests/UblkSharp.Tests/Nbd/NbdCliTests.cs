using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using UblkSharp.Interop;

namespace UblkSharp.Tests.Nbd;

/// <summary>`ublksharp serve` and `ublksharp add -t nbd` from the command line (no ublk driver needed).</summary>
public class NbdCliTests
{
    [Theory]
    [InlineData("--listen 127.0.0.1:10809", "bad listen address '127.0.0.1:10809'")]
    [InlineData("--listen tcp://example.com:1", "is not an IP address")]
    [InlineData("--listen tcp://127.0.0.1:77777", "the port must be a number from 0 to 65535")]
    [InlineData("--listen tcp://0.0.0.0:10809", "with no TLS and no authentication")]
    [InlineData("--listen tcp://[::]:10809", "add --insecure")]
    [InlineData("--listen tcp://192.0.2.1:10809", "listen on loopback (127.0.0.1, [::1]) or a unix socket")]
    [InlineData("--listen unix://relative", "needs an absolute path")]
    [InlineData("--listen unix:///tmp/x.sock --execution fast", "bad --execution 'fast'")]
    [InlineData("--listen unix:///tmp/x.sock --workers 0", "Workers must be 1 to 1024")]
    [InlineData("--listen unix:///tmp/x.sock --idle-timeout -1", "bad --idle-timeout -1: give seconds, from 0 (never) to a year")]
    [InlineData("--listen unix:///tmp/x.sock --handshake-timeout 0", "bad --handshake-timeout 0: give seconds, from more than 0 to a year")]
    [InlineData("--listen unix:///tmp/x.sock --metrics tcp://0.0.0.0:1", "--metrics tcp://0.0.0.0:1 would serve the daemon's figures beyond this machine: use a loopback address")]
    [InlineData("--listen unix:///tmp/x.sock --metrics tcp://[::]:1", "or add --metrics-insecure")]
    [InlineData("--listen unix:///tmp/x.sock --metrics tcp://127.0.0.1", "bad --metrics address 'tcp://127.0.0.1': give the port")]
    [InlineData("--listen unix:///tmp/x.sock --metrics http://127.0.0.1:1", "bad --metrics address")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls maybe", "bad --tls 'maybe': use off, on or require")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls require", "--tls require needs --tls-certificates DIR (with server-cert.pem, server-key.pem and ca-cert.pem) or --tls-psk FILE")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls-verify-peer", "--tls-certificates, --tls-verify-peer and --tls-psk need --tls on or --tls require")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls-psk /nonexistent/keys.psk", "--tls-certificates, --tls-verify-peer and --tls-psk need --tls on or --tls require")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls require --tls-psk /nonexistent/keys.psk", "--tls-psk: /nonexistent/keys.psk does not exist (make it with psktool")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls on --tls-psk /nonexistent/keys.psk --tls-verify-peer", "--tls-psk cannot be combined with --tls-certificates or --tls-verify-peer")]
    [InlineData("--listen tcp://127.0.0.1:0 --tls on --tls-certificates /nonexistent/dir", "TLS certificates directory /nonexistent/dir does not exist")]
    [InlineData("--listen tcp://192.0.2.1:10809 --tls on --tls-certificates /nonexistent/dir", "--tls on serves them too")]
    public void BadServeInputGivesOneClearLine(string args, string message)
    {
        var (code, stdout, stderr) = Cli($"serve -t mem --size 16M {args}");
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        var line = Assert.Single(stderr.Trim().Split('\n'));
        Assert.StartsWith("ublksharp: ", line, StringComparison.Ordinal);
        Assert.Contains(message, line, StringComparison.Ordinal);
    }

    /// <summary>
    /// --insecure lets a listener beyond loopback start, and says so every time. The address is one
    /// this machine does not have (TEST-NET-1), so nothing is ever exposed: the warning comes first,
    /// then the bind fails.
    /// </summary>
    [Fact]
    public void InsecureWarnsEveryTime()
    {
        var (code, _, stderr) = Cli("serve -t mem --size 16M --listen tcp://192.0.2.1:10809 --insecure");
        Assert.Equal(1, code);
        var lines = stderr.Trim().Split('\n');
        Assert.StartsWith("ublksharp: warning: --insecure: tcp://192.0.2.1:10809 exports the disk to anyone", lines[0], StringComparison.Ordinal);
        Assert.Contains("cannot listen on tcp://192.0.2.1:10809", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void ServeRefusesAPathThatIsNotASocketAndAPortInUse()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-cli-");
        try
        {
            var file = Path.Combine(dir.FullName, "precious");
            File.WriteAllText(file, "keep me");
            var (code, _, stderr) = Cli($"serve -t mem --size 16M --listen unix://{file}");
            Assert.Equal(1, code);
            Assert.Contains("exists and is not a socket", stderr, StringComparison.Ordinal);
            Assert.Equal("keep me", File.ReadAllText(file));
            using var busy = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            busy.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            busy.Listen(1);
            var port = ((IPEndPoint)busy.LocalEndPoint!).Port;
            (code, _, stderr) = Cli($"serve -t mem --size 16M --listen tcp://127.0.0.1:{port}");
            Assert.Equal(1, code);
            Assert.Contains($"cannot listen on tcp://127.0.0.1:{port}", stderr, StringComparison.Ordinal);
            Assert.Single(stderr.Trim().Split('\n'));
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void ServeExportsUntilSigterm()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-cli-");
        var socket = Path.Combine(dir.FullName, "s.sock");
        var image = Path.Combine(dir.FullName, "disk.img");
        File.WriteAllBytes(image, new byte[8 << 20]);
        var psi = CliStart($"serve -t loop -f {image} --listen unix://{socket} --export disk --description \"a test disk\"");
        using var p = Process.Start(psi)!;
        try
        {
            var first = p.StandardOutput.ReadLine();
            Assert.Equal($"unix://{socket}", first);
            var uri = $"nbd+unix:///disk?socket={socket}";
            Assert.Contains("a test disk", Tools.Ok("nbdinfo", uri), StringComparison.Ordinal);
            var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x7e 1M 64k", "-c", "flush", uri);
            Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
            Processes.Signal(p.Id, 15);
            Assert.True(p.WaitForExit(20_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, p.ExitCode);
            Assert.False(File.Exists(socket), "the socket was left behind");
            var bytes = File.ReadAllBytes(image);
            Assert.True(bytes.AsSpan(1 << 20, 65536).IndexOfAnyExcept((byte)0x7e) < 0, "the write did not reach the file");
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
            }
            dir.Delete(recursive: true);
        }
    }

    /// <summary>
    /// `serve --metrics unix://PATH`: a scrape (curl, parsed strictly by prometheus_client) counts
    /// exactly what a libnbd client did, after that client has gone.
    /// </summary>
    [Fact]
    public async Task ServeMetricsCountsWhatAClientDid()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-cli-");
        var socket = Path.Combine(dir.FullName, "s.sock");
        var metrics = Path.Combine(dir.FullName, "m.sock");
        using var p = Process.Start(CliStart($"serve -t mem --size 16M --listen unix://{socket} --export disk --metrics unix://{metrics}"))!;
        try
        {
            Assert.Equal($"unix://{socket}", p.StandardOutput.ReadLine());
            Tools.Nbdsh($"nbd+unix:///disk?socket={socket}", """
                for i in range(7):
                    h.pread(4096, i * 4096)
                for i in range(3):
                    h.pwrite(b'y' * 65536, i * 65536)
                h.flush()
                h.shutdown()
                """);
            // The connection closes on the server's side a moment after the client's shutdown.
            const string closed = "counter ublksharp_nbd_connections_closed_total  1.0";
            string[] samples = [];
            for (var tries = 0; tries < 100 && !samples.Contains(closed); tries++)
            {
                Thread.Sleep(tries == 0 ? 0 : 50);
                samples = await Runtime.PrometheusTextTests.ParseStrictly(Tools.Ok("curl", "-sf", "--unix-socket", metrics, "http://localhost/metrics"));
            }
            Assert.Contains(closed, samples);
            Assert.Contains("counter ublksharp_nbd_requests_total export=disk,op=read 7.0", samples);
            Assert.Contains("counter ublksharp_nbd_requests_total export=disk,op=write 3.0", samples);
            Assert.Contains("counter ublksharp_nbd_requests_total export=disk,op=flush 1.0", samples);
            Assert.Contains($"counter ublksharp_nbd_bytes_total export=disk,op=write {3 * 65536}.0", samples);
            Assert.Contains("histogram ublksharp_nbd_request_duration_seconds_count export=disk,op=read 7.0", samples);
            Assert.Contains("gauge ublksharp_nbd_connections  0.0", samples);
            Processes.Signal(p.Id, 15);
            Assert.True(p.WaitForExit(20_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, p.ExitCode);
            Assert.False(File.Exists(metrics), "the metrics socket was left behind");
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
            }
            dir.Delete(recursive: true);
        }
    }

    [Theory]
    [InlineData("add -t nbd", "the nbd target needs --uri")]
    [InlineData("add -t nbd --uri nbd:/x", "bad NBD URI 'nbd:/x'")]
    [InlineData("add -t nbd --uri nbds://127.0.0.1/x", "TLS needs a directory with ca-cert.pem")]
    [InlineData("add -t nbd --uri nbds://127.0.0.1/x --tls-certificates /nonexistent/pki", "TLS certificates directory /nonexistent/pki does not exist")]
    [InlineData("add -t nbd --uri nbd://127.0.0.1/x --tls-certificates /tmp", "--tls-certificates is for TLS")]
    [InlineData("add -t nbd --uri nbds://127.0.0.1/x?tls-certificates=/tmp", "/tmp/ca-cert.pem is missing")]
    [InlineData("add -t nbd --uri nbds://alice@127.0.0.1/x?tls-psk-file=/nonexistent/keys.psk", "nbds://alice@127.0.0.1/x?tls-psk-file=/nonexistent/keys.psk: cannot read the PSK file /nonexistent/keys.psk")]
    [InlineData("add -t nbd --uri nbds://127.0.0.1/x --tls-psk /nonexistent/keys.psk", "cannot read the PSK file /nonexistent/keys.psk")]
    [InlineData("add -t nbd --uri nbd://127.0.0.1/x --tls-psk /nonexistent/keys.psk", "--tls-psk is for TLS")]
    [InlineData("add -t nbd --uri nbd+unix://alice@/x?socket=/tmp/s", "a user name (USER@) is a TLS-PSK identity, for nbds:// and nbds+unix:// URIs")]
    [InlineData("add -t nbd --uri nbds://127.0.0.1/x?tls-psk-file=/k&tls-certificates=/c", "tls-certificates (x509) and tls-psk-file (PSK) exclude each other")]
    [InlineData("add -t nbd --uri nbd+unix:///x?socket=/nonexistent/nbd.sock", "cannot connect to nbd+unix:///x?socket=/nonexistent/nbd.sock")]
    [InlineData("serve -t nbd --uri nbd+unix:///?socket=/nonexistent/nbd.sock --listen tcp://127.0.0.1:0", "cannot connect to")]
    public void BadNbdTargetInputGivesOneClearLine(string args, string message)
    {
        var (code, _, stderr) = Cli(args);
        Assert.NotEqual(0, code);
        var line = Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains(message, line, StringComparison.Ordinal);
    }

    [Fact]
    public void ServeCanExportAnNbdTargetInFrontOfNbdkit()
    {
        using var nbdkit = new Nbdkit("memory", "8M");
        var dir = Directory.CreateTempSubdirectory("ublksharp-cli-");
        var socket = Path.Combine(dir.FullName, "proxy.sock");
        using var p = Process.Start(CliStart($"serve -t nbd --uri nbd+unix:///?socket={nbdkit.SocketPath} --listen unix://{socket}"))!;
        try
        {
            Assert.Equal($"unix://{socket}", p.StandardOutput.ReadLine());
            var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x19 0 1M", "-c", "read -P 0x19 0 1M", $"nbd+unix:///?socket={socket}");
            Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
        }
        finally
        {
            Processes.Signal(p.Id, 15);
            p.WaitForExit(20_000);
            dir.Delete(recursive: true);
        }
    }

    private static string CliDll
    {
        get
        {
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            {
                if (File.Exists(Path.Combine(d.FullName, "UblkSharp.slnx")))
                {
                    return Path.Combine(d.FullName, "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli.dll");
                }
            }
            throw new InvalidOperationException("repository root not found");
        }
    }

    internal static ProcessStartInfo CliStart(string args)
    {
        Assert.True(File.Exists(CliDll), $"{CliDll} is missing: build the solution in Release first");
        return new ProcessStartInfo("dotnet", $"{CliDll} {args}") { RedirectStandardOutput = true, RedirectStandardError = true };
    }

    internal static (int Code, string Stdout, string Stderr) Cli(string args)
    {
        using var p = Process.Start(CliStart(args))!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(60_000))
        {
            p.Kill();
            Assert.Fail($"ublksharp {args} did not finish within 60 s");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }
}
