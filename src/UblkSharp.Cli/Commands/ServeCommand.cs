using System.CommandLine;
using System.Runtime.InteropServices;
using UblkSharp.Cli.Logging;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Targets;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp serve`: exports a target over NBD, in the foreground, until SIGTERM or SIGINT. With
/// --ublk the same process also serves the same target as a ublk device, so one daemon (and one
/// target object) answers both: what is written through one is read through the other. With
/// --metrics a scrape shows the export's and its connections' figures (and the device's, with --ublk).
/// </summary>
internal static class ServeCommand
{
    public static Command Create()
    {
        var target = new TargetOptions();
        var listen = new Option<string>("--listen", "-l") { Description = "Where to listen: tcp://HOST:PORT (port 0: any free one) or unix:///PATH", Required = true };
        var export = new Option<string>("--export", "-e") { Description = "The export's name (clients asking for the default export get it too)", DefaultValueFactory = _ => "" };
        var description = new Option<string?>("--description") { Description = "The export's description, shown by nbdinfo" };
        var maxConnections = new Option<int>("--max-connections") { Description = "Connections served at once", DefaultValueFactory = _ => 1024 };
        var handshakeTimeout = new Option<double>("--handshake-timeout") { Description = "Seconds a client has to finish the handshake, counted from its connect", DefaultValueFactory = _ => 10 };
        var idleTimeout = new Option<double>("--idle-timeout") { Description = "Close a connection that sent no request for this many seconds (0: never; the Linux nbd driver keeps idle connections open)", DefaultValueFactory = _ => 0 };
        var workers = new Option<int>("--workers") { Description = "Threads for target calls that may block, shared by all connections", DefaultValueFactory = _ => 16 };
        var execution = new Option<string>("--execution") { Description = "Where target calls run: auto (inline while they are fast), inline, or workers", DefaultValueFactory = _ => "auto" };
        var insecure = new Option<bool>("--insecure") { Description = "Listen beyond loopback without --tls require (anyone who reaches the port without TLS can read and write the export)" };
        var tls = new Option<string>("--tls") { Description = "NBD over TLS (NBD_OPT_STARTTLS): off, on (plain clients too) or require", DefaultValueFactory = _ => "off" };
        var tlsCertificates = new Option<string?>("--tls-certificates") { Description = "--tls: directory with server-cert.pem, server-key.pem and ca-cert.pem (the qemu and nbdkit layout)" };
        var tlsVerifyPeer = new Option<bool>("--tls-verify-peer") { Description = "--tls: clients must present a certificate issued by ca-cert.pem" };
        var tlsPsk = new Option<string?>("--tls-psk") { Description = "--tls: pre-shared keys instead of certificates: a psktool file of username:hexkey lines (mode 600)" };
        var ublk = new Option<bool>("--ublk") { Description = "Also serve the target as a ublk device (/dev/ublkbN) from this process" };
        var number = new Option<int>("--number", "-n") { Description = "--ublk: device id (default: the first free one)", DefaultValueFactory = _ => -1 };
        var queues = new Option<int>("--queues", "-q") { Description = "--ublk: hardware queues", DefaultValueFactory = _ => 1 };
        var depth = new Option<int>("--depth", "-d") { Description = "--ublk: requests in flight per queue", DefaultValueFactory = _ => 128 };
        var metrics = new MetricsOptions();

        var command = new Command("serve", "Export a target over NBD (and, with --ublk, as a ublk device too) until SIGTERM or SIGINT");
        target.AddTo(command);
        foreach (var o in new Option[] { listen, export, description, maxConnections, handshakeTimeout, idleTimeout, workers, execution, insecure, tls, tlsCertificates, tlsVerifyPeer, tlsPsk, ublk, number, queues, depth })
        {
            command.Options.Add(o);
        }
        metrics.AddTo(command);
        command.SetAction(r =>
        {
            var kind = target.Kind(r);
            var recipe = target.Recipe(r);
            var address = NbdAddress.ParseListen(r.GetValue(listen)!);
            var tlsMode = r.GetValue(tls) switch
            {
                "off" => NbdTlsMode.Off,
                "on" => NbdTlsMode.On,
                "require" => NbdTlsMode.Require,
                var other => throw new ArgumentException($"bad --tls '{other}': use off, on or require"),
            };
            if (!address.IsUnix && !address.IsLoopback && tlsMode != NbdTlsMode.Require)
            {
                if (!r.GetValue(insecure))
                {
                    throw new ArgumentException($"--listen {address} would export the disk beyond this machine with no TLS and no authentication{(tlsMode == NbdTlsMode.On ? " for clients that skip TLS (--tls on serves them too)" : "")}: add --tls require, listen on loopback (127.0.0.1, [::1]) or a unix socket, or add --insecure");
                }
                // Every start says it, so nobody forgets it runs so.
                CliLog.Warning($"warning: --insecure: {address} exports the disk to anyone who can reach it{(tlsMode == NbdTlsMode.On ? " without TLS (--tls on lets plain clients in)" : ", with no TLS and no authentication")}");
            }
            var tlsOptions = Tls(tlsMode, r.GetValue(tlsCertificates), r.GetValue(tlsVerifyPeer), r.GetValue(tlsPsk));
            var metricsAddress = metrics.Checked(r, "the export's");
            var readOnly = r.GetValue(target.ReadOnly);
            var serverOptions = new NbdServerOptions
            {
                MaxConnections = r.GetValue(maxConnections),
                HandshakeTimeout = Seconds(r.GetValue(handshakeTimeout), "--handshake-timeout", zeroAllowed: false),
                IdleTimeout = Seconds(r.GetValue(idleTimeout), "--idle-timeout"),
                Workers = r.GetValue(workers),
                Execution = r.GetValue(execution) switch
                {
                    "auto" => NbdExecution.Auto,
                    "inline" => NbdExecution.Inline,
                    "workers" => NbdExecution.Workers,
                    var other => throw new ArgumentException($"bad --execution '{other}': use auto, inline or workers"),
                },
                LoggerFactory = CliLog.Factory,
                Tls = tlsOptions,
            };
            try
            {
                serverOptions.Validate();
            }
            catch (ArgumentOutOfRangeException e)
            {
                throw new ArgumentException(e.Message.Split(" (Parameter")[0], e);
            }
            DeviceOptions? deviceOptions = null;
            if (r.GetValue(ublk))
            {
                deviceOptions = new DeviceOptions { DeviceId = r.GetValue(number), Queues = r.GetValue(queues), Depth = r.GetValue(depth), LoggerFactory = CliLog.Factory };
                deviceOptions.Validate();
            }
            return Serve(kind, recipe, address, r.GetValue(export)!, r.GetValue(description), readOnly, serverOptions, deviceOptions, metricsAddress);
        });
        return command;
    }

    private static NbdTlsOptions? Tls(NbdTlsMode mode, string? directory, bool verifyPeer, string? psk)
    {
        if (mode == NbdTlsMode.Off)
        {
            return directory is not null || verifyPeer || psk is not null
                ? throw new ArgumentException("--tls-certificates, --tls-verify-peer and --tls-psk need --tls on or --tls require")
                : null;
        }
        if (psk is not null)
        {
            return directory is not null || verifyPeer
                // x509 is SslStream's and PSK GnuTLS's: one listener speaks one of them.
                ? throw new ArgumentException("--tls-psk cannot be combined with --tls-certificates or --tls-verify-peer: give one kind of credentials")
                : Psk(mode, Path.GetFullPath(psk));
        }
        if (directory is null)
        {
            throw new ArgumentException($"--tls {mode.ToString().ToLowerInvariant()} needs --tls-certificates DIR (with server-cert.pem, server-key.pem and ca-cert.pem) or --tls-psk FILE");
        }
        var options = NbdTlsOptions.Load(Path.GetFullPath(directory), mode, verifyPeer);
        var key = Path.Combine(Path.GetFullPath(directory), "server-key.pem");
        if (!OperatingSystem.IsWindows() && (File.GetUnixFileMode(key) & (UnixFileMode.GroupRead | UnixFileMode.OtherRead | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite)) != 0)
        {
            // Still served: the key may be shared on purpose (a group for the service), but it should be a choice.
            CliLog.Warning($"warning: {key} can be read or written by other users than its owner (chmod 600 it)");
        }
        return options;
    }

    private static NbdTlsOptions Psk(NbdTlsMode mode, string file)
    {
        if (!File.Exists(file))
        {
            throw new ArgumentException($"--tls-psk: {file} does not exist (make it with psktool -u USER -p {file})");
        }
        // Refused, not warned about as a certificate key is: the file holds every client's secret,
        // and anyone who can read it can connect as any of them.
        if (!OperatingSystem.IsWindows() && (File.GetUnixFileMode(file) & (UnixFileMode.GroupRead | UnixFileMode.OtherRead | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite)) != 0)
        {
            throw new ArgumentException($"--tls-psk: {file} can be read or written by other users than its owner: chmod 600 it");
        }
        return NbdTlsOptions.LoadPsk(file, mode);
    }

    // Asked for in the foreground: a failure to listen ends serve with the reason (add's daemon serves on without).
    private static MetricsEndpoint StartMetrics(string metrics, Func<string> text)
    {
        try
        {
            return MetricsEndpoint.Start(MetricsEndpoint.Parse(metrics, insecure: true), text);
        }
        catch (System.Net.Sockets.SocketException e)
        {
            throw new IOException($"cannot serve --metrics at {metrics}: {e.Message}", e);
        }
    }

    private static TimeSpan Seconds(double value, string option, bool zeroAllowed = true)
        => double.IsFinite(value) && value <= 86_400 * 365 && (value > 0 || (zeroAllowed && value == 0))
            ? TimeSpan.FromSeconds(value)
            : throw new ArgumentException($"bad {option} {value}: give seconds, from {(zeroAllowed ? "0 (never)" : "more than 0")} to a year");

    private static int Serve(string kind, Dictionary<string, string> recipe, NbdAddress address, string exportName, string? description,
        bool readOnly, NbdServerOptions serverOptions, DeviceOptions? deviceOptions, string? metrics)
    {
        var target = TargetFactory.Create(kind, recipe, CliLog.Factory);
        NbdServer server;
        NbdExport export;
        try
        {
            export = new NbdExport(exportName, target, readOnly, description);
            if (deviceOptions is not null)
            {
                Preflight.RequireDriver();
            }
            server = NbdServer.Start(address, export, serverOptions);
        }
        catch
        {
            target.Dispose(); // nothing has used it yet
            throw;
        }
        using var stop = new ManualResetEventSlim();
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
        UblkDevice? device = null;
        StatsEndpoint? stats = null;
        MetricsEndpoint? prometheus = null;
        try
        {
            if (metrics is not null)
            {
                // Listening before the address is printed: whoever waits for that line can scrape at once.
                prometheus = StartMetrics(metrics, () => PrometheusText.Write(device is null ? [] : [device.Stats()], server.Stats()));
            }
            Console.WriteLine(server.Address);
            if (deviceOptions is not null)
            {
                device = UblkDevice.Create(target, deviceOptions);
                (DeviceRecord.Of(device, kind, recipe, target.Size) with { Files = FileIdentity.OfRecipe(recipe) }).Save();
                stats = StatsEndpoint.Start(device); // `ublksharp stats` sees the ublk side (not the NBD one yet)
                Console.WriteLine(device.BlockPath);
            }
            CliLog.Information($"serving {kind} ({target.Size} bytes{(export.IsReadOnly ? ", read-only" : "")}) as export '{exportName}' on {server.Address}" +
                (serverOptions.Tls is { } t ? $" (TLS {t.Mode.ToString().ToLowerInvariant()}{(t.PskFile is not null ? ", PSK" : t.VerifyPeer ? ", client certificates required" : "")})" : "") +
                (device is null ? "" : $" and as {device.BlockPath}"));
            // Until a signal, or until someone stops the device (ublksharp del).
            while (!stop.Wait(250) && (device is null || !device.WaitForStop(TimeSpan.Zero)))
            {
            }
        }
        finally
        {
            // Connections finish what they have in flight before the device and the target go.
            prometheus?.Dispose(); // first: a scrape reads the device, which goes below
            server.Dispose();
            stats?.Dispose();
            var queuesEnded = true;
            try
            {
                if (device is not null)
                {
                    var id = device.Id;
                    queuesEnded = false;
                    device.Dispose();
                    queuesEnded = true;
                    DeviceRecord.Remove(id);
                }
            }
            finally
            {
                // The target is closed only when no thread can be inside it: a mem target unmapped
                // under a live copy would take the process down. Else it is left to the process's end.
                if (!queuesEnded)
                {
                    CliLog.Warning("the device's queues did not end; the target is left open");
                }
                else if (!server.ReleaseWhenIdle(target))
                {
                    CliLog.Warning("an NBD connection is still inside the target; it is closed once that call returns");
                }
            }
        }
        CliLog.Information($"stopped; {server.ConnectionsAccepted} connections, {server.RequestsServed} requests served, {server.RequestsRefused} refused");
        return 0;
    }
}
