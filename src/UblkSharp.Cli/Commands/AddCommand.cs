using System.CommandLine;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp add`: creates a device and serves it. Without --foreground the command starts a
/// detached daemon, waits until the device is live, prints its path and returns.
/// </summary>
internal static class AddCommand
{
    public static Command Create()
    {
        var type = new Option<string>("--type", "-t") { Description = "Target type: null, mem, loop or fault", Required = true };
        var file = new Option<string?>("--file", "-f") { Description = "loop: the backing file or block device" };
        var size = new Option<string?>("--size", "-s") { Description = "null, mem: the device size, e.g. 1G" };
        var directIo = new Option<bool>("--direct-io") { Description = "loop: open the backing file with O_DIRECT" };
        var readOnly = new Option<bool>("--read-only") { Description = "loop: a read-only device" };
        var faultBase = new Option<string?>("--base") { Description = "fault: the target type to wrap (null, mem, loop)" };
        var seed = new Option<string?>("--seed") { Description = "fault: seed of the fault schedule" };
        var shortIo = new Option<string?>("--short") { Description = "fault: rate of short backend IO (0-1), retried" };
        var again = new Option<string?>("--eagain") { Description = "fault: rate of EAGAIN (0-1), retried" };
        var eio = new Option<string?>("--eio") { Description = "fault: rate of EIO (0-1), failed to the client" };
        var delay = new Option<string?>("--delay") { Description = "fault: rate of delayed requests (0-1)" };
        var delayMs = new Option<string?>("--delay-ms") { Description = "fault: the delay in milliseconds (default 5)" };
        var number = new Option<int>("--number", "-n") { Description = "Device id (default: the first free one)", DefaultValueFactory = _ => -1 };
        var queues = new Option<int>("--queues", "-q") { Description = "Hardware queues, one thread each", DefaultValueFactory = _ => 1 };
        var depth = new Option<int>("--depth", "-d") { Description = "Requests in flight per queue", DefaultValueFactory = _ => 128 };
        var maxIo = new Option<string?>("--max-io") { Description = "Largest request (default 512K)" };
        var foreground = new Option<bool>("--foreground") { Description = "Serve in this process until SIGTERM or SIGINT (for systemd)" };
        var readyFile = new Option<string?>("--ready-file") { Hidden = true };

        var command = new Command("add", "Create a ublk device and serve it")
        {
            type, file, size, directIo, readOnly, faultBase, seed, shortIo, again, eio, delay, delayMs,
            number, queues, depth, maxIo, foreground, readyFile,
        };
        command.SetAction(r =>
        {
            var recipe = new Dictionary<string, string>();
            void Put(string key, string? value)
            {
                if (value is not null)
                {
                    recipe[key] = value;
                }
            }
            Put("file", r.GetValue(file));
            Put("size", r.GetValue(size));
            Put("direct-io", r.GetValue(directIo) ? "on" : null);
            Put("read-only", r.GetValue(readOnly) ? "on" : null);
            Put("base", r.GetValue(faultBase));
            Put("seed", r.GetValue(seed));
            Put("short", r.GetValue(shortIo));
            Put("eagain", r.GetValue(again));
            Put("eio", r.GetValue(eio));
            Put("delay", r.GetValue(delay));
            Put("delay-ms", r.GetValue(delayMs));
            var kind = r.GetValue(type)!;
            var maxIoText = r.GetValue(maxIo);
            var options = new DeviceOptions
            {
                DeviceId = r.GetValue(number),
                Queues = r.GetValue(queues),
                Depth = r.GetValue(depth),
                MaxIoBytes = maxIoText is null ? 512 * 1024 : (int)Math.Min(int.MaxValue, ByteSize.Parse(maxIoText)),
            };
            options.Validate();
            if (r.GetValue(foreground))
            {
                Preflight.RequireRootAndDriver();
                return Serve(kind, recipe, options, r.GetValue(readyFile));
            }
            // Bad input is reported first, and before any daemon starts.
            TargetFactory.Create(kind, recipe).Dispose();
            Preflight.RequireRootAndDriver();
            var (_, path) = DaemonLauncher.Launch(Program.Arguments);
            Console.WriteLine(path);
            return 0;
        });
        return command;
    }

    private static int Serve(string kind, Dictionary<string, string> recipe, DeviceOptions options, string? readyFile)
    {
        try
        {
            using var target = TargetFactory.Create(kind, recipe);
            using var device = UblkDevice.Create(target, options);
            new DeviceRecord
            {
                Id = device.Id,
                Pid = Environment.ProcessId,
                Target = kind,
                Recipe = recipe,
                Queues = device.Info.nr_hw_queues,
                Depth = device.Info.queue_depth,
                Size = target.Size,
            }.Save();
            using var stop = new ManualResetEventSlim();
            using var term = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
            using var intr = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
            Console.WriteLine(device.BlockPath);
            DaemonLauncher.ReportReady(readyFile, device.Id, device.BlockPath);
            // Serve until a signal, or until someone else stops the device (ublksharp del).
            while (!stop.Wait(250) && !device.WaitForStop(TimeSpan.Zero))
            {
            }
            var id = device.Id;
            device.Dispose();
            DeviceRecord.Remove(id);
            Console.Error.WriteLine($"ublksharp: device {id} stopped; {device.Errors} requests failed");
            return 0;
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            DaemonLauncher.ReportFailure(readyFile, CliErrors.Describe(e));
            throw;
        }
    }
}
